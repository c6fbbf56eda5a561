"""Image utility in the backend, on small generated images: scores in the prediction meta, the
task data field and /status; ``move_to_end`` orders low-utility tasks last. No shared data.

The predictor is a real exported network with an untrained 2-way head, so its scores differ
from image to image; the threshold is set at their median so both sides are populated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw, ImageFilter

from backend.app import create_app
from backend.queueing import OrderRequest
from backend.service import BoxloopService
from backend.settings import Settings, SettingsError
from backend.utility.predictor import UtilityNet, UtilityPredictor, export_predictor

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="square"/></RectangleLabels></View>'
)


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (160, 120), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x, y = int(rng.integers(0, 140)), int(rng.integers(0, 100))
        draw.rectangle([x, y, x + 20, y + 20], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    if seed % 2:
        image = image.filter(ImageFilter.GaussianBlur(3))
    image.save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("utility")
    images = root / "images"
    images.mkdir()
    paths = []
    for t in range(1, 9):
        _image(images / f"{t}.png", t)
        paths.append(images / f"{t}.png")
    model = export_predictor(UtilityNet(pretrained=True).eval(), root / "utility.onnx")
    probe = UtilityPredictor(model, num_threads=1)
    scores = probe.predict_proba([Image.open(p).convert("RGB") for p in paths])
    threshold = float(np.median(scores))
    settings = Settings(
        data_dir=root / "data",
        allowed_local_roots=[images],
        reconcile_on_startup=False,
        train_after_new_annotations=10_000,
        num_threads=1,
        utility_model=model,
        utility_action="move_to_end",
        utility_threshold=threshold,
    )
    service = BoxloopService(settings)
    service.setup(1, CONFIG)
    service.store.upsert_tasks(1, [(t, {"image": str(paths[t - 1])}) for t in range(1, 9)])
    yield service, paths, scores, threshold
    service.close()


def test_predict_writes_utility_into_meta_task_data_and_status(setup) -> None:  # type: ignore[no-untyped-def]
    service, paths, scores, threshold = setup
    app = create_app(service=service)
    tasks = [{"id": t, "project": 1, "data": {"image": str(paths[t - 1])}} for t in (1, 2, 3)]
    with TestClient(app) as client:
        response = client.post("/predict", json={"tasks": tasks, "project": "1"})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        for t, result in zip((1, 2, 3), results, strict=True):
            assert result["meta"]["utility"] == pytest.approx(scores[t - 1], abs=1e-3)
            assert result["meta"]["low_utility"] == bool(scores[t - 1] < threshold)
        service._queue_pool.submit(lambda: None).result()  # the background write is done
        data = dict(service.store.list_tasks(1))
        assert data[2]["boxloop_utility"] == pytest.approx(scores[1], abs=1e-3)
        assert data[2]["image"] == str(paths[1])
        status = client.get("/status").json()
        utility = status["projects"][0]["utility"]
        assert utility["scored"] == 3
        assert utility["low_utility"] == int((scores[:3] < threshold).sum())


def test_move_to_end_orders_low_utility_tasks_last(setup) -> None:  # type: ignore[no-untyped-def]
    service, _, scores, threshold = setup
    plan = service.queue.order(1, OrderRequest(strategy="random", push=False, seed=3))
    low = {t for t in range(1, 9) if scores[t - 1] < threshold}
    assert 0 < len(low) < 8
    assert set(plan.task_ids[-len(low) :]) == low
    assert plan.params["utility_moved_to_end"] == len(low)
    assert [plan.ranks[t] for t in plan.task_ids] == sorted(plan.ranks.values())
    assert len(service.store.get_order(1).task_ids) == 8  # type: ignore[union-attr]
    data = dict(service.store.list_tasks(1))
    assert all("boxloop_utility" in data[t] for t in range(1, 9))  # every task scored


def test_new_tasks_under_move_to_end_are_scored_and_low_ones_placed_last(setup) -> None:  # type: ignore[no-untyped-def]
    """TASKS_CREATED placement under ``move_to_end``: the new tasks are scored, stored, and a
    low-utility one goes after every useful task, as in a fresh order; tasks whose rank did not
    move are not written again."""
    service, paths, _, threshold = setup
    service.queue.order(1, OrderRequest(strategy="random", push=False, seed=3))
    before = service.store.get_order(1)
    assert before is not None
    folder = paths[0].parent
    new = list(range(9, 15))
    for t in new:
        _image(folder / f"{t}.png", t)
    service.store.upsert_tasks(1, [(t, {"image": str(folder / f"{t}.png")}) for t in new])
    changed = service.queue.place_new(1, new)
    after = service.store.get_order(1)
    assert after is not None and sorted(after.task_ids) == list(range(1, 15))
    data = dict(service.store.list_tasks(1))
    score = {t: data[t]["boxloop_utility"] for t in after.task_ids}  # every new task scored
    low = [score[t] < threshold for t in after.task_ids]
    assert any(low) and not all(low)
    assert low == sorted(low)  # no useful task after a low-utility one
    ranks = [after.params["ranks"][i] for i in range(len(after.task_ids))]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    assert set(new) <= set(changed)
    old_rank = dict(zip(before.task_ids, before.params["ranks"], strict=True))
    new_rank = dict(zip(after.task_ids, ranks, strict=True))
    assert set(changed) == {t for t in after.task_ids if old_rank.get(t) != new_rank[t]}


def test_a_missing_predictor_is_a_clear_error_at_start(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, utility_model=tmp_path / "nope.onnx")
    with pytest.raises(SettingsError, match=r"BOXLOOP_UTILITY_MODEL names .* which is no file"):
        BoxloopService(settings)
