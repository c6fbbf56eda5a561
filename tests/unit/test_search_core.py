"""The search model's pieces on small generated inputs: queries, painting, nets, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.search import (
    QUERY_SIZE,
    QueryError,
    SearchModel,
    SearchModelConfig,
    SketchSet,
    TrainConfig,
    TrainImage,
    box_masks,
    load_search_model,
    paint_query_tensor,
    parse_query,
    train_search_model,
)
from backend.search.nets import SpatialEncoder
from backend.search.sketch import object_raster, render_strokes, strokes_into_box
from benchmark.search_metrics import (
    average_precision_at_k,
    ndcg_at_k,
    precision_at_k,
    relevance,
)


def test_parse_query_converts_percent_boxes_and_strokes() -> None:
    query = parse_query(
        {
            "objects": [
                {"box": {"x": 10, "y": 20, "width": 30, "height": 40}, "label": "car"},
                {
                    "box": {"x": 50, "y": 50, "width": 50, "height": 50},
                    "strokes": [[[55, 60], [70, 80]]],
                },
            ]
        },
        labels=["car", "person"],
    )
    assert query.objects[0].box == pytest.approx((0.1, 0.2, 0.4, 0.6))
    assert not query.objects[0].is_sketch
    assert query.objects[1].is_sketch
    assert query.objects[1].strokes == (((0.55, 0.6), (0.7, 0.8)),)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "JSON object"),
        ({"objects": []}, "non-empty"),
        ({"objects": [{"label": "car"}]}, "box"),
        ({"objects": [{"box": {"x": 0, "y": 0, "width": 0, "height": 5}, "label": "car"}]}, "> 0"),
        (
            {"objects": [{"box": {"x": 90, "y": 0, "width": 20, "height": 5}, "label": "car"}]},
            "inside",
        ),
        ({"objects": [{"box": {"x": 0, "y": 0, "width": 5, "height": 5}}]}, "label or strokes"),
        (
            {"objects": [{"box": {"x": 0, "y": 0, "width": 5, "height": 5}, "label": "cow"}]},
            "unknown class",
        ),
        (
            {"objects": [{"box": {"x": 0, "y": 0, "width": 5, "height": 5}, "strokes": [[[1]]]}]},
            "[x, y]",
        ),
        (
            {"objects": [{"box": {"x": "a", "y": 0, "width": 5, "height": 5}, "label": "car"}]},
            "number",
        ),
        (
            {
                "objects": [
                    {"box": {"x": 0, "y": 0, "width": 5, "height": 5}, "label": "car", "z": 1}
                ]
            },
            "unknown field",
        ),
    ],
)
def test_parse_query_refuses_bad_input_with_a_message(payload: object, message: str) -> None:
    with pytest.raises(QueryError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_query(payload, labels=["car"])


def test_paint_weights_overlaps_by_one_over_kappa_and_pools_to_31() -> None:
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    left = torch.tensor([[0.0, 0.0, 0.6, 1.0]])
    right = torch.tensor([[0.4, 0.0, 1.0, 1.0]])
    tensor = paint_query_tensor(torch.cat([a, b]), torch.cat([left, right]))
    assert tensor.shape == (2, QUERY_SIZE, QUERY_SIZE)
    row = tensor[:, 15]
    # left only: (1, 0); overlap (κ = 2): (0.5, 0.5); right only: (0, 1)
    assert row[:, 0].tolist() == [1.0, 0.0]
    assert row[:, 15].tolist() == [0.5, 0.5]
    assert row[:, 30].tolist() == [0.0, 1.0]
    # an empty canvas region stays a zero vector
    lone = paint_query_tensor(a, torch.tensor([[0.0, 0.0, 0.2, 0.2]]))
    assert lone[:, 30, 30].abs().sum() == 0
    assert lone[0, 0, 0] == 1.0


def test_a_tiny_box_still_covers_a_cell() -> None:
    masks = box_masks(torch.tensor([[0.5, 0.5, 0.5001, 0.5001]]), 93)
    assert masks.sum() == 1


def test_spatial_encoder_maps_31_to_7() -> None:
    net = SpatialEncoder(16, 4).eval()
    out = net(torch.zeros(2, 16, 31, 31))
    assert out.shape == (2, 4, 7, 7)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in net.modules() if isinstance(m, torch.nn.MaxPool2d)]
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 3
    assert len(pools) == 2 and len(norms) == 3


def test_sketch_raster_draws_strokes_inside_the_box() -> None:
    strokes = strokes_into_box([((0.0, 0.0), (1.0, 1.0))], (0.5, 0.5, 1.0, 1.0), margin=0.0)
    assert strokes[0][0] == pytest.approx((0.5, 0.5))
    from backend.search import QueryObject

    image = np.asarray(object_raster(QueryObject((0.5, 0.5, 1.0, 1.0), None, strokes)))
    assert image.shape == (224, 224, 3)
    assert image[112, 112].max() < 50  # the diagonal is drawn
    assert image[10, 200].min() == 255  # off the line stays white
    assert np.asarray(render_strokes([((0.5, 0.5),)])).min() == 0  # a single point is a dot


def _toy_images(rng: np.random.Generator, n: int) -> tuple[list[TrainImage], SketchSet]:
    """Class 0 lives on the left half of the map, class 1 on the right; crops carry the class."""
    images = []
    proto = rng.normal(size=(2, 1280)).astype(np.float32)
    for i in range(n):
        cls = i % 2
        fmap = rng.normal(size=(320, 7, 7)).astype(np.float32) * 0.1
        cols = slice(0, 3) if cls == 0 else slice(4, 7)
        fmap[cls * 10 : cls * 10 + 10, :, cols] += 2.0
        box = np.array([[0.0, 0.2, 0.45, 0.8]] if cls == 0 else [[0.55, 0.2, 1.0, 0.8]], np.float32)
        crops = proto[cls][None] + 0.1 * rng.normal(size=(1, 1280)).astype(np.float32)
        images.append(TrainImage(fmap.reshape(-1), box, np.array([cls]), crops))
    sketches = SketchSet(
        np.concatenate([proto[c][None] + 0.3 * rng.normal(size=(6, 1280)) for c in (0, 1)]).astype(
            np.float32
        ),
        np.repeat([0, 1], 6),
    )
    return images, sketches


def test_training_learns_a_separable_toy_layout_and_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    images, sketches = _toy_images(rng, 24)
    config = TrainConfig(
        model=SearchModelConfig(object_dim=16, layout_channels=4, index_dim=16, hidden=16),
        object_steps=60,
        spatial_epochs=25,
        spatial_batch=8,
        num_threads=1,
    )
    model = train_search_model(["left thing", "right thing"], images, sketches, config)
    e_images = model.encode_maps(np.stack([im.map for im in images]))
    assert e_images.shape == (24, 4 * 49)
    query = model.encode_objects(
        model.sketch_embeddings(sketches.features[:1]), np.array([[0.0, 0.2, 0.45, 0.8]])
    )
    scores = (e_images @ query.T).ravel()
    labels = np.array([im.labels[0] for im in images])
    assert scores[labels == 0].mean() > scores[labels == 1].mean()
    reduced = model.reduce(e_images)
    assert reduced.shape == (24, 16)
    assert np.allclose(np.linalg.norm(reduced, axis=1), 1, atol=1e-5)
    model.save(tmp_path)
    again = load_search_model(tmp_path)
    assert again.digest == model.digest
    assert np.allclose(
        again.encode_maps(np.stack([im.map for im in images[:3]])), e_images[:3], atol=1e-6
    )
    with pytest.raises(KeyError):
        again.class_embeddings(["nothing"])
    with pytest.raises(FileNotFoundError, match="search-train"):
        load_search_model(tmp_path / "missing")
    assert SearchModel.create(["a"], config.model).config.embedding_dim == 196


def test_metrics_match_the_worked_cases_of_method_notes() -> None:
    rel = np.array([1, 0, 1, 0, 0, 1, 1.0])
    assert average_precision_at_k(np.arange(5), rel, 5, 0.5) == pytest.approx(0.41667, abs=1e-4)
    graded = np.array([0.8, 0.0, 0.6, 0.9, 0.3])
    assert ndcg_at_k(np.arange(3), graded, 3, 0.0) == pytest.approx(0.645, abs=1e-3)
    assert ndcg_at_k(np.arange(3), graded, 3, 0.0, exponential=True) == pytest.approx(
        0.628, abs=1e-3
    )
    assert precision_at_k(np.arange(5), rel, 5, 0.5) == pytest.approx(0.4)
    # a ranking shorter than K: the missing places are misses (it gave 2 of 2 = 1.0)
    assert precision_at_k(np.array([0, 2]), np.array([1.0, 0.0, 1.0]), 20, 0.5) == 0.1
    assert np.isnan(average_precision_at_k(np.arange(2), np.zeros(3), 2, 0.5))


def test_relevance_is_mean_over_query_boxes_of_best_same_class_iou() -> None:
    q_boxes = np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    q_labels = np.array([0, 1])
    images = [
        np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]),
        np.array([[0, 0, 0.5, 0.5]]),
        np.zeros((0, 4)),
    ]
    labels = [np.array([0, 1]), np.array([1]), np.zeros(0, int)]
    assert relevance(q_boxes, q_labels, images, labels).tolist() == pytest.approx([1.0, 0.0, 0.0])
    half = relevance(q_boxes, q_labels, [np.array([[0, 0, 0.5, 0.5]])], [np.array([0])])
    assert half.tolist() == pytest.approx([0.5])
