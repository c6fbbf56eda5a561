"""Box-level active learning: answers, measures, core-set, the campaign state and the pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from backend.active import (
    BoxCampaign,
    BoxPool,
    box_features_at,
    box_scores,
    image_scores,
    predict_pool,
    resolve_queries,
    select_boxes,
    select_images,
)
from backend.boxes import Boxes
from backend.detectors.yolox import YoloxNano
from backend.ordering.greedy import greedy_order
from backend.training.samples import TrainSample
from backend.training.yolox_train import _target

SIZE = (200, 100)


def _b(
    rows: list[tuple[float, float, float, float, int]], scores: list[float] | None = None
) -> Boxes:
    xyxy = np.array([r[:4] for r in rows], np.float32).reshape(-1, 4)
    labels = np.array([r[4] for r in rows], np.int64)
    s = None if scores is None else np.array(scores, np.float32)
    return Boxes(xyxy, labels, SIZE, s)


def _pool(
    probs: list[list[float]], objectness: list[float], image: list[int] | None = None
) -> BoxPool:
    class_probs = np.array(probs, np.float32) * np.array(objectness, np.float32)[:, None]
    n = len(probs)
    return BoxPool(
        image=np.array(image or [0] * n, np.int64),
        xyxy=np.tile(np.array([[0, 0, 10, 10]], np.float32), (n, 1)) + np.arange(n)[:, None] * 20,
        labels=class_probs.argmax(1),
        scores=class_probs.max(1),
        class_probs=class_probs,
        objectness=np.array(objectness, np.float32),
        features=None,
        image_sizes=(SIZE, SIZE),
    )


# ---------------------------------------------------------------------------------- answers
def test_queries_are_adjusted_confirmed_duplicated_or_background() -> None:
    truth = _b([(10, 10, 50, 50, 0), (100, 10, 150, 60, 1), (160, 60, 190, 90, 1)])
    queries = _b(
        [
            (12, 12, 52, 52, 1),  # right place, wrong class → adjusted, class from the answer
            (100, 10, 150, 60, 1),  # exact → confirmed
            (101, 11, 151, 61, 1),  # the same object again → duplicate
            (60, 60, 90, 95, 0),  # nothing there → background
        ]
    )
    answers = resolve_queries(queries, truth)
    assert answers.kind == ("adjusted", "confirmed", "duplicate", "background")
    assert answers.matched.tolist() == [0, 1, -1, -1]
    assert answers.drawn.tolist() == [2]  # the object no query found: drawn by the annotator
    assert answers.labeled == 2 and answers.count("background") == 1


def test_an_ignored_object_is_neither_a_label_nor_background() -> None:
    """A query on a VOC ``difficult`` object was answered "background": the campaign trained
    "no object" at full weight on a real object. It is ``ignored`` now: no label, no verified
    background, a box of weight 0 in training (neither object nor background), and its region
    is never asked again."""
    truth = Boxes(
        np.array([[10, 10, 50, 50]], np.float32), np.array([0]), SIZE, ignore=np.array([True])
    )
    queries = _b([(10, 10, 50, 50, 0), (60, 60, 90, 95, 0)])
    answers = resolve_queries(queries, truth)
    assert answers.kind == ("ignored", "background") and answers.drawn.tolist() == []
    assert answers.labeled == 0
    campaign = BoxCampaign([SIZE])
    campaign.record_answers(0, queries, answers, truth)
    c = campaign.counts
    counts = (c.queried, c.ignored, c.background, c.boxes_labeled, c.boxes_looked_at)
    assert counts == (2, 1, 1, 0, 2)
    pool = BoxPool(
        image=np.zeros(2, np.int64),
        xyxy=np.array([[11, 11, 51, 51], [100, 100, 140, 140]], np.float32),
        labels=np.zeros(2, np.int64),
        scores=np.full(2, 0.5, np.float32),
        class_probs=np.zeros((2, 1), np.float32),
        objectness=np.zeros(2, np.float32),
        features=None,
        image_sizes=(SIZE,),
    )
    assert campaign.eligible(pool).tolist() == [False, True]  # asked once, not again
    (sample,) = campaign.training_samples(pool, ["img"], 0.5)
    assert sample.boxes.xyxy.tolist() == [[100, 100, 140, 140], [10, 10, 50, 50]]
    assert sample.box_weights is not None and sample.box_weights.tolist() == [0.5, 0.0]
    assert sample.verified_background is not None
    assert sample.verified_background.tolist() == [[60, 60, 90, 95]]


def test_a_query_inside_a_crowd_is_ignored_by_the_datasets_rule() -> None:
    """COCO crowds and KITTI ``DontCare`` are judged by intersection over the query's area, as
    their evaluations do: a person box inside a crowd region has a small IoU with it and was
    answered "background"."""
    crowd = Boxes(
        np.array([[0, 0, 200, 100]], np.float32), np.array([0]), SIZE, ignore=np.array([True])
    )
    query = _b([(50, 20, 80, 80, 1)])  # another class, inside the region
    assert resolve_queries(query, crowd).kind == ("background",)  # IoU 0.09: the VOC rule
    assert resolve_queries(query, crowd, ignore_overlap="pred_area").kind == ("ignored",)


def test_an_adjustment_goes_to_the_object_of_largest_overlap() -> None:
    truth = _b([(0, 0, 100, 100, 0), (10, 0, 110, 100, 1)])
    answers = resolve_queries(_b([(9, 0, 109, 100, 0)]), truth)
    assert answers.matched.tolist() == [1] and answers.kind == ("adjusted",)


# ---------------------------------------------------------------------------------- measures
def test_uncertainty_entropy_and_margin_rank_the_doubtful_box_first() -> None:
    pool = _pool([[0.98, 0.01, 0.01], [0.4, 0.35, 0.25]], [0.95, 0.6])
    for measure in ("uncertainty", "entropy", "margin"):
        scores = box_scores(pool, measure)
        assert scores[1] > scores[0], measure
        assert select_boxes(pool, measure, 1).tolist() == [1]
    # uncertainty is 1 - P with P = objectness x best class
    assert box_scores(pool, "uncertainty")[0] == pytest.approx(1 - 0.95 * 0.98, abs=1e-6)
    # a box whose two best outcomes tie has margin 1
    tie = _pool([[0.5, 0.5]], [1.0])
    assert box_scores(tie, "margin")[0] == pytest.approx(1.0)


def test_entropy_and_margin_keep_the_share_no_class_takes() -> None:
    """The box's outcomes were ``[P_c, 1 − objectness]`` renormalised: at objectness 1 a
    single-class box was [1, 0], "certain", whatever its class score. "No class" takes what the
    classes leave, so a single-class box is [P, 1 − P], as uncertainty reads it."""
    obj = [1.0, 0.99, 0.9, 0.6]
    pool = _pool([[0.3], [0.2], [0.9], [0.9]], obj)  # P = 0.3, 0.198, 0.81, 0.54
    p = pool.scores.astype(np.float64)
    binary = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    for measure in ("entropy", "margin"):
        scores = box_scores(pool, measure)
        assert scores[0] > scores[2] and scores[1] > scores[2], measure
        assert scores[0] > 0.5, measure  # the objectness-1 box is doubtful, not certain
    np.testing.assert_allclose(box_scores(pool, "entropy"), binary, rtol=1e-5)
    np.testing.assert_allclose(box_scores(pool, "margin"), 1 - np.abs(2 * p - 1), rtol=1e-5)
    # several classes: one leading class at objectness ~1 with a low score leaves most to
    # "no class"; sigmoid scores summing past 1 are scaled to sum to 1 ("no class" then 0)
    multi = _pool([[0.35, 0.05, 0.05], [0.95, 0.02, 0.02], [0.9, 0.8, 0.1]], [1.0, 1.0, 1.0])
    entropy, margin = box_scores(multi, "entropy"), box_scores(multi, "margin")
    dist0 = np.array([0.35, 0.05, 0.05, 0.55])
    assert entropy[0] == pytest.approx(-(dist0 * np.log(dist0)).sum(), rel=1e-5)
    assert margin[0] == pytest.approx(1 - (0.55 - 0.35), rel=1e-5)
    assert entropy[0] > entropy[1] and margin[0] > margin[1]
    assert margin[2] == pytest.approx(1 - (0.9 - 0.8) / 1.8, rel=1e-5)


def test_selection_respects_eligibility_and_is_seeded() -> None:
    pool = _pool([[0.9, 0.1]] * 6, [0.5, 0.9, 0.2, 0.8, 0.3, 0.7])
    eligible = np.array([True, True, False, True, True, True])
    picked = select_boxes(pool, "uncertainty", 3, eligible=eligible)
    assert picked.tolist() == [4, 0, 5]  # 2 would be first but is answered
    a = select_boxes(pool, "random", 4, seed=3)
    assert a.tolist() == select_boxes(pool, "random", 4, seed=3).tolist()
    assert len(set(a.tolist())) == 4


def test_box_coreset_is_farthest_first_from_the_labelled_boxes() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 8)).astype(np.float32)
    labeled = rng.normal(size=(5, 8)).astype(np.float32)
    pool = _pool([[1.0]] * 40, [0.5] * 40)
    pool = BoxPool(**{**pool.__dict__, "features": feats})
    picked = select_boxes(pool, "coreset", 7, labeled_features=labeled)
    # brute force: farthest-first in float64
    chosen: list[int] = []
    ref = np.concatenate([labeled, feats]).astype(np.float64)
    dist = np.min(((ref[None, 5:] - ref[:5, None]) ** 2).sum(-1), axis=0)
    for _ in range(7):
        j = int(np.argmax(np.where(np.isin(np.arange(40), chosen), -1, dist)))
        chosen.append(j)
        dist = np.minimum(dist, ((ref[5:] - ref[5 + j]) ** 2).sum(-1))
    assert picked.tolist() == chosen
    # only eligible boxes, and the ids are pool rows
    eligible = np.zeros(40, bool)
    eligible[20:] = True
    assert all(
        i >= 20
        for i in select_boxes(pool, "coreset", 5, eligible=eligible, labeled_features=labeled)
    )


def test_coreset_with_nothing_labelled_starts_at_a_seeded_candidate() -> None:
    """With no labelled boxes farthest-first started at candidate 0 whatever the seed."""
    feats = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    pool = _pool([[1.0]] * 50, [0.5] * 50)
    pool = BoxPool(**{**pool.__dict__, "features": feats})
    firsts = {int(select_boxes(pool, "coreset", 4, seed=s)[0]) for s in range(6)}
    assert len(firsts) > 1
    a = select_boxes(pool, "coreset", 4, seed=3)
    assert a.tolist() == select_boxes(pool, "coreset", 4, seed=3).tolist()
    assert len(set(a.tolist())) == 4  # the seeded start is the first of K
    # then farthest-first from it
    rest = greedy_order(feats, "dissimilar", [int(a[0])], limit=3).order
    assert a.tolist() == rest.tolist()
    eligible = np.zeros(50, bool)
    eligible[30:] = True
    picked = select_boxes(pool, "coreset", 5, eligible=eligible, seed=1)
    assert len(picked) == 5 and (picked >= 30).all()
    assert select_boxes(pool, "coreset", 1, seed=2).tolist() == [
        int(select_boxes(pool, "coreset", 4, seed=2)[0])
    ]
    # image-level core-set from no labelled image, too
    firsts = {
        int(select_images(range(50), "coreset", 2, image_features=feats, seed=s)[0])
        for s in range(6)
    }
    assert len(firsts) > 1


def test_greedy_order_with_a_limit_is_the_prefix_of_the_full_order() -> None:
    feats = np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32)
    full = greedy_order(feats, "dissimilar", [3, 7])
    part = greedy_order(feats, "dissimilar", [3, 7], limit=25)
    assert part.order.tolist() == full.order[:27].tolist()
    none = greedy_order(feats, "dissimilar", [], limit=5)
    assert none.order.tolist() == greedy_order(feats, "dissimilar", []).order[:5].tolist()


def test_image_measures_average_their_boxes() -> None:
    pool = _pool([[0.9, 0.1], [0.5, 0.5], [0.99, 0.01]], [0.9, 0.5, 0.99], image=[0, 0, 1])
    scores = image_scores(pool, "uncertainty", 3)
    assert scores[0] == pytest.approx(np.mean(box_scores(pool, "uncertainty")[:2]))
    assert scores[2] == 0.0  # no predicted box
    assert select_images([0, 1, 2], "uncertainty", 2, pool=pool, n_images=3).tolist() == [0, 1]
    feats = np.array([[0, 0], [1, 0], [10, 0], [0, 0.5]], np.float32)
    assert select_images(
        [1, 2, 3], "coreset", 2, image_features=feats, labeled_images=[0]
    ).tolist() == [2, 1]


# ---------------------------------------------------------------------------------- campaign
def test_the_campaign_trains_on_answers_and_damped_noisy_boxes() -> None:
    pool = BoxPool(
        image=np.array([0, 0, 0, 1]),
        xyxy=np.array(
            [[10, 10, 50, 50], [100, 10, 150, 60], [60, 60, 90, 95], [5, 5, 30, 30]], np.float32
        ),
        labels=np.array([1, 1, 0, 0]),
        scores=np.array([0.4, 0.9, 0.3, 0.8], np.float32),
        class_probs=np.zeros((4, 2), np.float32),
        objectness=np.zeros(4, np.float32),
        features=None,
        image_sizes=(SIZE, SIZE),
    )
    truth0 = _b([(10, 10, 50, 50, 0), (100, 10, 150, 60, 1)])
    campaign = BoxCampaign([SIZE, SIZE])
    queries = pool.boxes([0, 2], 0)
    campaign.record_answers(0, queries, resolve_queries(queries, truth0), truth0)
    campaign.label_fully(1, _b([(5, 5, 30, 30, 0), (40, 40, 60, 60, 1)]))
    # answered regions and the complete image are out of the pool
    assert campaign.eligible(pool).tolist() == [False, True, False, False]
    c = campaign.counts
    assert (c.queried, c.adjusted, c.background, c.full_image_boxes) == (2, 1, 1, 2)
    assert (c.boxes_labeled, c.boxes_looked_at) == (3, 4)
    samples = campaign.training_samples(
        pool, ["img0", "img1"], noisy_weight=0.5, background_weight=0.25
    )
    first, second = samples
    assert first.boxes.labels.tolist() == [0, 1]  # the adjusted box with its true class + noisy
    assert first.box_weights is not None and first.box_weights.tolist() == [1.0, 0.5]
    # the partial image's unchecked regions weigh 0.25 as background, the query answered
    # "background" is verified; the complete image is stock (every weight 1)
    assert first.background_weight == 0.25
    assert first.verified_background is not None
    assert first.verified_background.tolist() == [[60, 60, 90, 95]]
    assert second.box_weights is None and second.background_weight == 1.0
    with pytest.raises(ValueError, match="labelled in full"):
        campaign.record_answers(1, queries, resolve_queries(queries, truth0), truth0)


def test_box_weights_follow_their_boxes_into_the_loss_target() -> None:
    image = Image.new("RGB", SIZE)
    boxes = Boxes(
        np.array(
            [[10, 10, 50, 50], [0, 0, 0.5, 0.5], [60, 10, 90, 40], [100, 10, 150, 60]], np.float32
        ),
        np.array([0, 1, 1, 0]),
        SIZE,
        ignore=np.array([False, False, True, False]),
    )
    sample = TrainSample(
        image=image, boxes=boxes, box_weights=np.array([1.0, 0.5, 0.7, 0.5], np.float32)
    )
    target = _target(sample, image, 1.0, False, (128, 224))
    # the ignored box and the sub-pixel one are dropped, each weight stays with its box
    assert target.weights is not None
    assert target.labels.tolist() == [0, 0] and target.weights.tolist() == [1.0, 0.5]
    plain = _target(TrainSample(image=image, boxes=boxes), image, 1.0, False, (128, 224))
    assert plain.weights is not None and plain.weights.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="box weights"):
        TrainSample(image=image, boxes=boxes, box_weights=np.ones(2, np.float32))


def test_verified_background_follows_the_image_into_the_loss_target() -> None:
    """Regions answered "no object" are rescaled, mirrored and letterboxed as the boxes are."""
    image = Image.new("RGB", (200, 100))
    regions = np.array([[10, 10, 50, 30]], np.float32)  # annotated on a 400x200 copy
    sample = TrainSample(
        image=image,
        boxes=Boxes.empty((400, 200)),
        background_weight=0.5,
        verified_background=regions,
    )
    target = _target(sample, image, 0.5, True, (64, 128))
    # half size (400 -> 200), mirrored in 200 px, then resized by r = 0.5
    assert target.background_weight == 0.5
    assert target.verified_background is not None
    assert target.verified_background.tolist() == [[87.5, 2.5, 97.5, 7.5]]
    with pytest.raises(ValueError, match="background_weight"):
        TrainSample(image=image, boxes=Boxes.empty((200, 100)), background_weight=-0.5)


# ---------------------------------------------------------------------------------- pool
def test_the_pool_keeps_each_box_distribution_and_feature() -> None:
    torch.manual_seed(0)
    model = YoloxNano(num_classes=3).eval()
    with torch.no_grad():  # confident biases, so that an untrained head predicts boxes
        for level in model.head.per_level():
            assert level.obj_pred.bias is not None and level.cls_pred.bias is not None
            level.obj_pred.bias.fill_(3.0)
            level.cls_pred.bias.fill_(0.0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)) for _ in range(3)]
    pool = predict_pool(model, images, (96, 160), score_threshold=0.01, max_per_image=20)
    assert len(pool) > 0 and set(pool.image.tolist()) <= {0, 1, 2}
    assert pool.features is not None and pool.features.shape == (len(pool), 64)
    assert np.allclose(pool.class_probs.max(1), pool.scores)
    assert (pool.scores >= 0.01).all() and (pool.xyxy[:, 2] <= 160).all()
    assert max(np.bincount(pool.image)) <= 20
    rows = pool.rows_of(1)
    got = box_features_at(model, images[1:2], [pool.boxes(rows, 1)], (96, 160))
    assert got[0].shape == (len(rows), 64)
    assert select_boxes(pool, "coreset", 4).tolist() == select_boxes(pool, "coreset", 4).tolist()


def test_a_pool_box_has_the_feature_it_gets_once_labelled() -> None:
    """The pool pooled a box on the level of the row that predicted it, the labelled boxes on
    the level their size picks: the same box had two features and the core-set saw a labelled
    box as far from its own prediction."""
    torch.manual_seed(0)
    model = YoloxNano(num_classes=3).eval()
    # stride-8 rows predict nothing; stride-16 rows boxes of 32 px (size level 0), stride-32
    # rows boxes of 96 px (size level 1): every box's row is a level off its size's
    with torch.no_grad():
        for level, (objectness, strides_wide) in zip(
            model.head.per_level(), [(-9.0, 1.0), (2.0, 2.0), (4.0, 3.0)], strict=True
        ):
            assert level.obj_pred.bias is not None and level.cls_pred.bias is not None
            assert level.reg_pred.bias is not None
            level.obj_pred.bias.fill_(objectness)
            level.cls_pred.bias.fill_(0.0)
            level.reg_pred.bias[2:].fill_(float(np.log(strides_wide)))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)) for _ in range(2)]
    hw = (192, 320)  # twice the image
    pool = predict_pool(model, images, hw, score_threshold=0.01, max_per_image=100)
    assert pool.features is not None
    per_image = [pool.boxes(pool.rows_of(i), i) for i in range(len(images))]
    again = np.concatenate(box_features_at(model, images, per_image, hw))
    # boxes clipped at the image's edge too: the pool pools the box it keeps
    edge = (pool.xyxy[:, :2] <= 0).any(1) | (pool.xyxy[:, 2] >= 160) | (pool.xyxy[:, 3] >= 90)
    assert edge.any() and (~edge).any()
    side = np.sqrt(np.prod(pool.xyxy[:, 2:] - pool.xyxy[:, :2], axis=1)) * 2
    sizes = np.searchsorted([64.0, 128.0], side)
    assert len(set(sizes.tolist())) >= 2, sizes  # more than one level is compared
    np.testing.assert_allclose(again, pool.features, atol=1e-4)


def test_the_pool_keeps_boxes_above_t_d_and_tops_up_to_k_while_scores_are_low() -> None:
    from backend.active import pool_members

    pool = _pool([[1.0]] * 5, [0.5] * 5)
    pool = BoxPool(
        **{**pool.__dict__, "scores": np.array([0.3, 0.05, 0.2, 0.02, 0.08], np.float32)}
    )
    assert pool_members(pool, 0.1, 2).tolist() == [0, 2]  # two above t_d: enough
    assert pool_members(pool, 0.1, 4).tolist() == [0, 1, 2, 4]  # topped up by score
    eligible = np.array([False, True, True, True, True])
    assert pool_members(pool, 0.1, 3, eligible=eligible).tolist() == [0, 1, 2, 4]


def test_labelled_box_features_follow_the_boxes_frame() -> None:
    """Boxes measured on another copy of the image (Label Studio's ``original_width``) were
    pooled as if in the loaded image's pixels: the core-set's starting list held the features
    of other places."""
    torch.manual_seed(0)
    model = YoloxNano(num_classes=3).eval()
    pixels = np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    here = Boxes(np.array([[10, 10, 60, 50]], np.float32), np.array([0]), (160, 90))
    twice_as_big = Boxes(np.array([[20, 20, 120, 100]], np.float32), np.array([0]), (320, 180))
    a, b = (
        box_features_at(model, [image], [boxes], (96, 160))[0] for boxes in (here, twice_as_big)
    )
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.linalg.norm(a) > 1e-4  # a feature, not an empty pool
