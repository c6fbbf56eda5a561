"""The in-process bulk engine: one result per item, failures confined to their item, a slow
image holding up nobody, items pulled lazily, and specs that rebuild the same model."""

from __future__ import annotations

import http.server
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

from backend.bulk.engine import InProcessEngine, make_engine
from backend.bulk.features import extract_features
from backend.bulk.work import DetectorSpec, LoadedSpec, WorkItem
from backend.images import ImageSource
from backend.store import Store
from tests.conftest import free_port, shared_data_dir


class MeanColour:
    """A model whose output is each image's mean colour; fails on an all-black image."""

    labels: ClassVar[list[str]] = []

    def __init__(self) -> None:
        self.batches: list[int] = []

    def extract(self, images: list[Image.Image], progress: bool = False) -> np.ndarray:
        self.batches.append(len(images))
        out = []
        for image in images:
            pixels = np.asarray(image, np.float32)
            if pixels.max() == 0:
                raise ValueError("a black image")
            out.append(pixels.reshape(-1, 3).mean(0))
        return np.stack(out)


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.new("RGB", (32, 24), (10 + i, 20, 30)).save(path)
        paths.append(path)
    return paths


def _source(root: Path) -> ImageSource:
    return ImageSource(None, None, allowed_local_roots=(root,), timeout_s=10)


def test_every_item_gets_one_result_and_failures_stay_with_their_item(tmp_path: Path) -> None:
    paths = _images(tmp_path / "img", 10)
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "img" / "black.png")
    items = [WorkItem(i, str(p)) for i, p in enumerate(paths)]
    items += [
        WorkItem(100, str(tmp_path / "img" / "missing.png")),
        WorkItem(101, str(tmp_path / "img" / "corrupt.jpg")),
        WorkItem(102, str(tmp_path / "img" / "black.png")),
        WorkItem(103, "/etc/passwd"),  # outside the allowed roots
    ]
    model = MeanColour()
    engine = InProcessEngine(batch_size=4, fetch_concurrency=3)
    results = {
        r.task_id: r for r in engine.run(items, LoadedSpec("mean", model), _source(tmp_path))
    }
    assert sorted(results) == sorted(i.task_id for i in items)
    for i in range(10):
        assert results[i].ok
        np.testing.assert_allclose(results[i].value, [10 + i, 20, 30], atol=1e-4)
    assert "no such file" in str(results[100].error)
    assert results[101].error and "not a decodable image" in results[101].error
    assert results[102].error == "ValueError: a black image"  # the batch retried one by one
    assert results[103].error and "allowed" in results[103].error
    assert max(model.batches) <= 4


class _SlowOnce(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``slow.png`` takes ``delay`` seconds."""

    delay: ClassVar[float] = 1.5

    def do_GET(self) -> None:
        if self.path.endswith("slow.png"):
            time.sleep(self.delay)
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_slow_image_delays_only_itself(tmp_path: Path) -> None:
    paths = _images(tmp_path / "www", 12)
    Image.new("RGB", (32, 24), (200, 20, 30)).save(tmp_path / "www" / "slow.png")
    port = free_port()
    handler = lambda *a: _SlowOnce(*a, directory=str(tmp_path / "www"))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{port}"
        items = [WorkItem(999, f"{base}/slow.png")]
        items += [WorkItem(i, f"{base}/{p.name}") for i, p in enumerate(paths)]
        source = ImageSource(None, None, allowed_hosts=(base,), timeout_s=10)
        engine = InProcessEngine(batch_size=4, fetch_concurrency=4)
        order = [r.task_id for r in engine.run(items, LoadedSpec("mean", MeanColour()), source)]
    finally:
        server.shutdown()
    # first in line, yet every other image was fetched and run before it came back
    assert order[-1] == 999 and sorted(order[:-1]) == list(range(12))


def test_items_are_pulled_lazily(tmp_path: Path) -> None:
    paths = _images(tmp_path / "img", 5)
    pulled = []

    def items() -> Iterator[WorkItem]:
        for i in range(10_000):
            pulled.append(i)
            yield WorkItem(i, str(paths[i % 5]))

    engine = InProcessEngine(batch_size=4, fetch_concurrency=8)
    stream = engine.run(items(), LoadedSpec("mean", MeanColour()), _source(tmp_path))
    next(stream)
    assert len(pulled) <= 2 * 8 + 4  # two fetch windows and a batch, never the whole list
    stream.close()


def test_loaded_models_refuse_to_travel_and_engines_follow_the_address() -> None:
    with pytest.raises(TypeError, match="DetectorSpec or EncoderSpec"):
        pickle.dumps(LoadedSpec("mean", MeanColour()))
    assert isinstance(
        make_engine(ray_address=None, batch_size=2, fetch_concurrency=2), InProcessEngine
    )
    with pytest.raises(ValueError):
        InProcessEngine(batch_size=0)


def test_extract_features_computes_only_what_is_missing(tmp_path: Path) -> None:
    paths = _images(tmp_path / "img", 6)
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    spec = LoadedSpec("mean-v1", MeanColour())
    engine = InProcessEngine(batch_size=4, fetch_concurrency=2)
    first = [WorkItem(i, str(p)) for i, p in enumerate(paths[:4])]
    report = extract_features(store, 1, spec, first, engine, _source(tmp_path), write_batch=3)
    assert sorted(report.computed) == [0, 1, 2, 3] and not report.failed
    everything = [WorkItem(i, str(p)) for i, p in enumerate(paths)]
    everything.append(WorkItem(9, str(tmp_path / "nope.png")))
    again = extract_features(store, 1, spec, everything, engine, _source(tmp_path))
    assert sorted(again.reused) == [0, 1, 2, 3] and sorted(again.computed) == [4, 5]
    assert list(again.failed) == [9]
    ids, vectors = store.get_features(1, "mean-v1")
    assert ids == [0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose(vectors[:, 0], [10, 11, 12, 13, 14, 15], atol=1e-4)


def test_a_detector_spec_rebuilds_the_same_detector(tmp_path: Path) -> None:
    model = shared_data_dir() / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    voc = shared_data_dir() / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages"
    if not model.is_file() or not voc.is_dir():
        pytest.skip(f"needs the shared COCO model and VOC images under {shared_data_dir()}")
    from backend.detectors.onnx_yolox import OnnxYoloxDetector

    detector = OnnxYoloxDetector.from_path(model).with_labels(["person", "dog", "car", "cat"])
    spec = pickle.loads(pickle.dumps(DetectorSpec.from_detector(detector)))
    images = [Image.open(p).convert("RGB") for p in sorted(voc.glob("*.jpg"))[:6]]
    rebuilt = spec.load().run(images)
    direct = detector.predict(images)
    assert sum(len(b) for b in direct) > 0
    for a, b in zip(rebuilt, direct, strict=True):
        assert a.labels.tolist() == b.labels.tolist()
        np.testing.assert_allclose(a.xyxy, b.xyxy, atol=1e-4)


class _SlowCheck:
    """A predictor whose first check takes its time (the first one loads the COCO model)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.checking = threading.Event()
        self.runs = 0

    def check(self, project_id: int, request: Any) -> None:
        if not self.checking.is_set():
            self.checking.set()
            self.release.wait(10)

    def run(self, project_id: int, request: Any, progress: bool = False) -> Any:
        self.runs += 1

        class Report:
            def to_dict(self) -> dict[str, Any]:
                return {"state": "done"}

        return Report()


def test_two_bulk_runs_requested_at_once_start_one(tmp_path: Path) -> None:
    """The state was read before the check and set after it: both requests passed, and two
    children predicted the same tasks."""
    from backend.bulk.predict import BulkPredictRequest
    from backend.bulk.runs import BulkRuns
    from backend.errors import ServiceError
    from backend.settings import Settings

    predictor = _SlowCheck()
    runs = BulkRuns(Settings(data_dir=tmp_path), predictor, lambda _: {})  # type: ignore[arg-type]
    first = threading.Thread(
        target=runs.start, args=(7, BulkPredictRequest()), kwargs={"in_process": True}
    )
    first.start()
    assert predictor.checking.wait(10)
    with pytest.raises(ServiceError) as refused:
        runs.start(7, BulkPredictRequest(), in_process=True)
    predictor.release.set()
    first.join(10)
    assert refused.value.status_code == 409 and predictor.runs == 1
    assert runs._state[7] == {"state": "done"}


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_run_whose_worker_cannot_be_set_up_fails_and_frees_the_project(tmp_path: Path) -> None:
    """Creating the log folder or the settings file happened outside the run's error handling:
    a failure there left the project "running", and every later request was a 409. The cleanup
    then removed a settings file under a log "folder" that is a file, and the run's thread died
    of that error."""
    from backend.bulk.predict import BulkPredictRequest
    from backend.bulk.runs import BulkRuns
    from backend.settings import Settings

    (tmp_path / "logs").write_text("a file where the log folder goes")
    predictor = _SlowCheck()
    predictor.checking.set()  # no waiting in check
    runs = BulkRuns(Settings(data_dir=tmp_path), predictor, lambda _: {})  # type: ignore[arg-type]
    state = runs.start(7, BulkPredictRequest(), wait=True)
    assert state["state"] == "failed" and "FileExistsError" in state["error"]
    assert runs.start(7, BulkPredictRequest(), in_process=True) == {"state": "done"}
