"""The Ray engine's actor-side callable, without a cluster: Arrow rows in, Arrow rows out, every
task's failure in its own row (a raised exception would fail and retry the whole block)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from backend.bulk.ray_engine import RayBatchRunner, _with_threads
from backend.bulk.work import EncoderSpec
from backend.images import ImageSource


class _MeanColour:
    """Outputs each image's mean colour; refuses images wider than 100 px."""

    def run(self, images: list[Image.Image]) -> list[np.ndarray]:
        if any(image.width > 100 for image in images):
            raise ValueError("too wide")
        return [np.asarray(image, np.float32).mean(axis=(0, 1)) for image in images]


@dataclass(frozen=True)
class _Spec:
    name: str = "mean-colour"

    def load(self) -> _MeanColour:
        return _MeanColour()


def _batch(rows: list[tuple[int, str]]) -> pa.Table:
    return pa.table(
        {"task_id": pa.array([r[0] for r in rows], pa.int64()), "reference": [r[1] for r in rows]}
    )


def test_a_batch_comes_back_as_one_row_per_task_with_its_own_error(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "small.png")
    Image.new("RGB", (200, 30), (1, 2, 3)).save(tmp_path / "wide.png")
    (tmp_path / "broken.png").write_bytes(b"no image here")
    runner = RayBatchRunner(_Spec(), ImageSource(None, None, (tmp_path,)), fetch_concurrency=2)
    out = runner(
        _batch(
            [
                (1, str(tmp_path / "small.png")),
                (2, str(tmp_path / "wide.png")),  # breaks the batch, then fails alone
                (3, str(tmp_path / "broken.png")),
                (4, str(tmp_path / "absent.png")),
                (5, "/etc/passwd"),  # outside the allowed roots
            ]
        )
    )
    assert out.schema.field("task_id").type == pa.int64()
    assert out.schema.field("payload").type == pa.binary()
    rows = {r["task_id"]: r for r in out.to_pylist()}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert rows[1]["error"] is None
    np.testing.assert_allclose(pickle.loads(rows[1]["payload"]), [10, 20, 30], atol=1)
    assert rows[2]["payload"] is None and rows[2]["error"] == "ValueError: too wide"
    for task_id in (3, 4, 5):
        assert rows[task_id]["payload"] is None and rows[task_id]["error"]


def test_actors_run_onnxruntime_with_the_threads_they_reserved(tmp_path: Path) -> None:
    spec = EncoderSpec("enc", tmp_path / "m.onnx", dim=8, num_threads=4)
    assert _with_threads(spec, 1).num_threads == 1  # type: ignore[attr-defined]
    assert _with_threads(_Spec(), 1) == _Spec()  # no num_threads field: sent as it is


def test_the_engine_refuses_nonsense_sizes() -> None:
    from backend.bulk.ray_engine import RayEngine

    with pytest.raises(ValueError):
        RayEngine("auto", batch_size=0)
    with pytest.raises(ValueError):
        RayEngine("auto", actors=0)
