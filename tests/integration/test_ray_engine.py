"""Integration: the Ray engine on a real local Ray cluster (a head node and a second node, each
its own ``ray start`` process) gives the same results as the in-process engine, and killing an
actor's worker process mid-run loses no task.

Slow by nature (starting the cluster, and torch imports in every fresh actor): about a minute
and a half on two cores.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.bulk.engine import InProcessEngine
from backend.bulk.work import DetectorSpec, EncoderSpec, ItemResult, ModelSpec, WorkItem
from backend.images import ImageSource
from tests.conftest import shared_data_dir

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from backend.bulk.ray_engine import RayEngine  # noqa: E402
from backend.bulk.ray_local import LocalRayCluster, start_local_cluster  # noqa: E402

pytestmark = [
    pytest.mark.timeout(400),
    # Ray Data's own DataContext copies trip its deprecation shims; not ours to fix.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
]

ACTOR_TITLE = "ray::MapWorker(MapBatches(RayBatchRunner))"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    with start_local_cluster(num_nodes=2, cpus_per_node=1) as local:
        ray.init(address=local.address, logging_level="ERROR", log_to_driver=False)
        try:
            alive = [n for n in ray.nodes() if n["Alive"]]
            assert len(alive) == 2, f"expected a head and a second node, got {alive}"
            assert len({n["NodeID"] for n in alive}) == 2
            yield local
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 generated JPEGs of varied sizes (and one corrupt file)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    for i in range(40):
        h, w = int(rng.integers(64, 240)), int(rng.integers(64, 320))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:02d}.jpg", quality=90)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def encoder_spec(tmp_path_factory: pytest.TempPathFactory) -> EncoderSpec:
    from backend.features.imgnet import effnet_lite0_extractor

    cache = tmp_path_factory.mktemp("onnx")
    return EncoderSpec.from_encoder(effnet_lite0_extractor(cache, num_threads=1))


def _items(files: list[Path], root: Path) -> list[WorkItem]:
    items = [WorkItem(100 + i, str(f)) for i, f in enumerate(files)]
    items.append(WorkItem(1, str(root / "corrupt.jpg")))
    items.append(WorkItem(2, str(root / "no-such-image.jpg")))
    return items


def _by_task(results: Iterator[ItemResult]) -> dict[int, ItemResult]:
    out: dict[int, ItemResult] = {}
    for result in results:
        assert result.task_id not in out, f"task {result.task_id} came back twice"
        out[result.task_id] = result
    return out


def _both(
    cluster: LocalRayCluster, spec: ModelSpec, items: list[WorkItem], source: ImageSource
) -> tuple[dict[int, ItemResult], dict[int, ItemResult]]:
    # One fetch at a time in process, blocks of one batch on Ray: both engines then run the
    # very same batches, so float32 results cannot differ by how images were batched (the
    # encoder runs a whole batch in one onnxruntime call).
    local = _by_task(InProcessEngine(batch_size=8, fetch_concurrency=1).run(items, spec, source))
    remote = _by_task(
        RayEngine(cluster.address, batch_size=8, block_rows=8).run(items, spec, source)
    )
    assert set(local) == set(remote) == {i.task_id for i in items}
    for task_id in (1, 2):  # the corrupt and the missing file fail alike on both engines
        assert not local[task_id].ok
        assert remote[task_id].error == local[task_id].error
    return local, remote


def test_features_on_ray_equal_in_process(
    cluster: LocalRayCluster, images: Path, encoder_spec: EncoderSpec
) -> None:
    files = sorted(images.glob("img*.jpg"))
    source = ImageSource(None, None, allowed_local_roots=(images,))
    local, remote = _both(cluster, encoder_spec, _items(files, images), source)
    ok = [t for t, r in local.items() if r.ok]
    assert len(ok) == len(files)
    for task_id in ok:
        assert remote[task_id].ok, remote[task_id].error
        a, b = np.asarray(local[task_id].value), np.asarray(remote[task_id].value)
        assert a.shape == b.shape == (encoder_spec.dim,)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_detections_on_ray_equal_in_process(cluster: LocalRayCluster, images: Path) -> None:
    from backend.detectors.onnx_yolox import OnnxYoloxDetector

    model = shared_data_dir() / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    photos = sorted((shared_data_dir() / "coco" / "mini").rglob("*.jpg"))[:40]
    if not model.is_file() or len(photos) < 10:
        pytest.skip(f"the COCO YOLOX-Nano ({model}) or COCO mini photos are absent")
    detector = OnnxYoloxDetector.from_path(model, num_threads=1).with_labels(
        ["person", "car", "dog", "cat", "bicycle", "bus", "chair", "bottle"]
    )
    spec = DetectorSpec.from_detector(detector, num_threads=1)
    roots = (images, photos[0].parent)
    source = ImageSource(None, None, allowed_local_roots=roots)
    items = _items(photos, images)
    local, remote = _both(cluster, spec, items, source)
    boxes_seen = 0
    for task_id, expected in local.items():
        if not expected.ok:
            continue
        got = remote[task_id]
        assert got.ok, got.error
        assert got.value.image_size == expected.value.image_size
        np.testing.assert_array_equal(got.value.labels, expected.value.labels)
        np.testing.assert_allclose(got.value.xyxy, expected.value.xyxy, atol=1e-4)
        np.testing.assert_allclose(got.value.scores, expected.value.scores, atol=1e-4)
        boxes_seen += len(expected.value.labels)
    assert boxes_seen > 0, "the COCO photos should give some boxes of these labels"


def test_killing_an_actor_mid_run_loses_no_task(
    cluster: LocalRayCluster, images: Path, encoder_spec: EncoderSpec
) -> None:
    files = sorted(images.glob("img*.jpg"))
    items = [WorkItem(i, str(files[i % len(files)])) for i in range(1, 401)]
    source = ImageSource(None, None, allowed_local_roots=(images,))
    engine = RayEngine(cluster.address, batch_size=8, block_rows=8)

    results: dict[int, ItemResult] = {}
    killed: int | None = None
    before: list[int] = []
    for result in engine.run(items, encoder_spec, source):
        assert result.task_id not in results, f"task {result.task_id} came back twice"
        results[result.task_id] = result
        if killed is None and len(results) >= 16:
            before = cluster.worker_pids(ACTOR_TITLE)
            assert before, "no actor process of the map_batches pool found"
            killed = before[0]
            os.kill(killed, signal.SIGKILL)
    assert killed is not None, "the run ended before an actor could be killed"
    time.sleep(0.5)
    assert killed not in cluster.worker_pids(ACTOR_TITLE)

    assert set(results) == {i.task_id for i in items}
    failed = {t: r.error for t, r in results.items() if not r.ok}
    assert not failed, failed
    dims = {np.asarray(r.value).shape for r in results.values()}
    assert dims == {(encoder_spec.dim,)}
