"""The server's bulk runs: the worker child stopped by a signal, and the request's bounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from backend.app import create_app
from backend.bulk.predict import BulkPredictRequest
from backend.ingest import MAX_ID
from backend.settings import Settings, settings_to_json
from backend.store import Store
from tests.synthetic import LABEL_CONFIG

REPO = Path(__file__).resolve().parents[2]

#: ``python -m backend.bulk_worker`` itself, its service swapped for one whose Label Studio lists
#: tasks slowly and endlessly (so the run is mid-way when the signal comes) and whose detector
#: finds nothing; the run, its store and its signal handling are the real ones.
_CHILD = """
import sys, time
from pathlib import Path
from types import SimpleNamespace

import backend.bulk_worker as worker
from backend.boxes import Boxes
from backend.bulk.predict import BulkPredictor
from backend.images import ImageSource
from backend.store import Store

images = Path(sys.argv[1])


class Detector:
    labels = ["Square", "Disc"]
    version = "v1"

    def predict(self, batch):
        return [Boxes.empty(image.size, with_scores=True) for image in batch]


class Studio:
    def iter_task_versions(self, project_id):
        for task_id in range(1, 100_000):
            time.sleep(0.02)
            yield {"id": task_id, "data": {"image": str(images / "1.png")}, "model_versions": []}

    def import_predictions(self, project_id, version, batch):
        return []


class Service:
    def __init__(self, settings):
        self.store = Store(settings.resolved_database_url)
        model = SimpleNamespace(detector=Detector(), version="v1")
        self.bulk = BulkPredictor(
            settings,
            self.store,
            SimpleNamespace(current=lambda project_id, labels: model),
            studio_for=lambda project_id: Studio(),
            image_source_for=lambda project_id: ImageSource(
                None, None, allowed_local_roots=(images,)
            ),
        )

    def close(self):
        self.store.close()


if sys.argv[2] == "cli":  # ``boxloop predict``: the run in this process
    import backend.service
    from backend.cli import main


    class CliService(Service):
        def run_bulk_predict(self, project_id, request, **_):
            return self.bulk.run(project_id, request, progress=False).to_dict()


    backend.service.BoxloopService = CliService
    sys.exit(main(["predict", "--project", "1", "--push-batch", "2"]))
worker.BoxloopService = Service
sys.exit(worker.main(sys.argv[3:]))
"""


@pytest.mark.parametrize(
    ("entry", "signum"),
    [("worker", signal.SIGTERM), ("worker", signal.SIGHUP), ("cli", signal.SIGTERM)],
    ids=["worker-SIGTERM", "worker-SIGHUP", "cli-SIGTERM"],
)
def test_a_worker_stopped_by_a_signal_marks_its_run_interrupted(
    tmp_path: Path, signum: signal.Signals, entry: str
) -> None:
    """The server's shutdown terminates its bulk children (SIGTERM). The worker had no handler,
    so the process died at once and its run stayed ``running`` in ``/status`` for good; so did
    ``boxloop predict`` (its run in its own process) stopped by SIGTERM or a closed terminal."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 24), (10, 20, 30)).save(images / "1.png")
    settings = Settings(data_dir=tmp_path, allowed_local_roots=[images], num_threads=1)
    store = Store(settings.resolved_database_url)
    store.upsert_project(
        1,
        label_config=LABEL_CONFIG,
        from_name="label",
        to_name="image",
        image_key="image",
        labels=["Square", "Disc"],
    )
    settings_path = tmp_path / "settings.json"
    settings_path.write_text(settings_to_json(settings))
    (tmp_path / "child.py").write_text(textwrap.dedent(_CHILD))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "BOXLOOP_DATA_DIR": str(tmp_path),
        "BOXLOOP_ALLOWED_LOCAL_ROOTS": str(images),
        "BOXLOOP_NUM_THREADS": "1",
    }
    child = subprocess.Popen(
        [
            *(sys.executable, str(tmp_path / "child.py"), str(images), entry),
            *("--project", "1", "--settings-json", str(settings_path)),
            *("--request-json", BulkPredictRequest(push_batch=2).model_dump_json()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            runs = store.list_bulk_runs(1)
            if runs and runs[0].done > 0:  # mid-way: imports made, more to go
                break
            time.sleep(0.2)
        assert child.poll() is None, "the worker ended before it was stopped"
        assert store.list_bulk_runs(1)[0].status == "running"
        child.send_signal(signum)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    (run,) = store.list_bulk_runs(1)
    assert run.status == "interrupted", err.decode()[-2000:]
    assert run.finished_at is not None and run.done > 0
    assert run.message is not None and f"stopped by {signum.name}" in run.message
    if entry == "cli":
        assert child.returncode == 130 and "boxloop predict: stopped" in err.decode()
    else:
        assert child.returncode == 1
        assert json.loads(out.decode().splitlines()[-1]) == {
            "state": "interrupted",
            "error": f"stopped by {signum.name}",
        }
    store.close()


def test_a_limit_past_any_project_is_refused_naming_the_field(tmp_path: Path) -> None:
    """``limit`` had no upper bound: 2**63 was accepted (202) and the run then failed in
    ``itertools.islice``."""
    assert BulkPredictRequest(limit=MAX_ID).limit == MAX_ID
    with pytest.raises(ValidationError, match="limit"):
        BulkPredictRequest(limit=MAX_ID + 1)
    settings = Settings(data_dir=tmp_path / "data", reconcile_on_startup=False)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/projects/1/bulk-predict", json={"limit": 2**63})
        assert answer.status_code == 422, answer.text
        assert "limit: Input should be less than or equal to" in answer.json()["error"]
        assert client.get("/status").json()["projects"] == []  # and nothing ran


def test_the_server_closing_waits_for_its_children_to_mark_their_runs(tmp_path: Path) -> None:
    """``BulkRuns.close`` sent SIGTERM and returned: the server exited at once, and its exit
    kills the children (``PR_SET_PDEATHSIG``) before they marked their runs ``interrupted``."""
    from backend.bulk.runs import BulkRuns

    marked = tmp_path / "marked"
    code = textwrap.dedent(f"""
        import pathlib, signal, sys, time
        def stop(*_):
            time.sleep(1)  # the run's last writes
            pathlib.Path({str(marked)!r}).write_text("interrupted")
            sys.exit(1)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        runs = BulkRuns(Settings(data_dir=tmp_path), None, lambda _: {})  # type: ignore[arg-type]
        runs._children[7] = child
        runs.close()
        assert child.returncode == 1 and marked.read_text() == "interrupted"
    finally:
        child.kill()
        child.communicate()
