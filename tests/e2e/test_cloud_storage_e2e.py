"""Tasks whose images live in an S3 bucket connected to a real Label Studio, pre-annotated.

Label Studio's cloud source storages put raw URIs (``s3://bucket/key``) into task data and
sends them to ML backends as they are. boxloop resolves them through the project's storage in
Label Studio (``/projects/{id}/presign/?fileuri=...``): with the storage's ``presign`` on,
Label Studio answers a redirect to a presigned URL of the bucket, which boxloop follows once,
without its token; with ``presign`` off Label Studio streams the bytes itself.

The bucket is a ``moto`` S3 server. moto needs botocore, which wants ``python-dateutil<3``,
while boxloop's lock pins ``python-dateutil`` 4: moto cannot live in boxloop's venv, so it gets
its own (``.venv-moto/`` in the repo root, or ``$BOXLOOP_MOTO_VENV``), installed here once the
way ``scripts/labelstudio.sh`` installs Label Studio (about 30 s, 300 MB), and runs as a
``moto_server`` subprocess. As for Label Studio, the only reason to skip is that PyPI cannot be
reached to install it.
"""

from __future__ import annotations

import base64
import fcntl
import io
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.images import ImageNotFound, load_image, presign_url
from backend.service import BoxloopService
from backend.settings import Settings
from tests.conftest import free_port
from tests.e2e.conftest import (
    REPO_ROOT,
    LabelStudioServer,
    StartBoxloop,
    connect_backend,
    label_config_for,
    retrieve_predictions,
    stop_process,
    task_predictions,
    wait_for,
    wait_for_health,
)

pytestmark = pytest.mark.e2e

#: moto and what is on the request path of its S3 server; pip resolves the rest.
MOTO_REQUIREMENTS = (
    "moto[server]==5.2.5",
    "boto3==1.44.8",
    "botocore==1.44.8",
    "Flask==3.1.3",
    "Werkzeug==3.1.9",
)
MOTO_VENV = Path(os.environ.get("BOXLOOP_MOTO_VENV", str(REPO_ROOT / ".venv-moto")))
_UNREACHABLE = (
    "NewConnectionError",
    "ConnectTimeout",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ProxyError",
)


def install_moto(venv: Path = MOTO_VENV) -> Path:
    """``moto_server`` of a venv holding :data:`MOTO_REQUIREMENTS` (created once, then reused;
    concurrent sessions wait for each other). Skips only when PyPI cannot be reached."""
    server = venv / "bin" / "moto_server"
    stamp = venv / ".boxloop-moto"
    want = " ".join(MOTO_REQUIREMENTS)

    def ready() -> bool:
        return stamp.is_file() and stamp.read_text() == want and server.is_file()

    if ready():
        return server
    venv.mkdir(parents=True, exist_ok=True)
    with (venv / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready():
            return server
        if not (venv / "bin" / "python").is_file():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        proc = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", *MOTO_REQUIREMENTS],
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        if proc.returncode != 0:
            output = proc.stdout + proc.stderr
            if any(marker in output for marker in _UNREACHABLE):
                pytest.skip(f"moto cannot be installed into {venv}: PyPI is unreachable")
            pytest.fail(f"installing {want} into {venv} failed:\n{output[-5000:]}", pytrace=False)
        stamp.write_text(want)
    return server


@dataclass
class MotoS3:
    """A running moto S3 server (no signature checks; objects are private)."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def create_bucket(self, bucket: str) -> None:
        # moto takes unsigned writes; reads of a private object need a signed (presigned) URL
        httpx.put(f"{self.url}/{bucket}", timeout=30).raise_for_status()

    def put_image(self, bucket: str, key: str, data: bytes) -> None:
        answer = httpx.put(
            f"{self.url}/{bucket}/{key}",
            content=data,
            headers={"Content-Type": "image/png"},
            timeout=30,
        )
        answer.raise_for_status()


@pytest.fixture(scope="module")
def moto_s3(
    label_studio: LabelStudioServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MotoS3]:
    """moto's S3 server on a free port of 127.0.0.1 (after Label Studio, which skips first)."""
    server = install_moto()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(f"{url}/", process, 60, log_path, "moto_server")
        yield MotoS3(url, process, log_path)
    finally:
        stop_process(process)


def _png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    image = Image.effect_noise(size, 30).convert("RGB")
    image.paste(colour, (4, 4, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _s3_project(
    ls: LabelStudioServer, s3: MotoS3, *, presign: bool
) -> tuple[int, str, dict[str, bytes]]:
    """A project over 2 images of a fresh bucket, imported by a synced S3 source storage:
    ``(project id, label config, {s3 URI: PNG bytes})``."""
    bucket = f"boxloop-{'presign' if presign else 'proxy'}-{secrets.token_hex(4)}"
    images = {
        f"s3://{bucket}/img_{i}.png": _png(size, colour)
        for i, (size, colour) in enumerate([((96, 64), (250, 10, 10)), ((80, 120), (10, 250, 10))])
    }
    s3.create_bucket(bucket)
    for uri, data in images.items():
        s3.put_image(bucket, uri.rsplit("/", 1)[-1], data)
    config = label_config_for(["square", "disc"])
    project = ls.client.projects.create(title=f"e2e {bucket}", label_config=config)
    assert project.id is not None
    storage = httpx.post(
        f"{ls.url}/api/storages/s3",
        headers=ls.auth_headers,
        json={
            "project": project.id,
            "title": bucket,
            "bucket": bucket,
            "regex_filter": r".*\.png$",
            "use_blob_urls": True,
            "presign": presign,
            "s3_endpoint": s3.url,
            "aws_access_key_id": "boxloop-e2e",
            "aws_secret_access_key": "boxloop-e2e-secret",
            "region_name": "us-east-1",
        },
        timeout=120,
    )
    assert storage.status_code == 201, storage.text
    synced = httpx.post(
        f"{ls.url}/api/storages/s3/{storage.json()['id']}/sync",
        headers=ls.auth_headers,
        timeout=120,
    )
    assert synced.status_code == 200, synced.text
    wait_for(
        lambda: len(ls.studio.list_tasks(project.id)) == len(images),
        timeout_s=60,
        what="the S3 storage sync to create the tasks",
    )
    return project.id, config, images


@pytest.mark.parametrize("presign", [True, False], ids=["presigned-redirect", "proxied"])
def test_tasks_of_an_s3_storage_are_pre_annotated(
    label_studio: LabelStudioServer, moto_s3: MotoS3, tmp_path: Path, presign: bool
) -> None:
    project_id, config, images = _s3_project(label_studio, moto_s3, presign=presign)
    # Label Studio stores the raw URI in the task and sends it so to /predict; its task API
    # (what boxloop reads for bulk predictions, queues and training) hands out its resolve route
    listed = label_studio.studio.list_tasks(project_id)
    raw: dict[int, str] = {}
    for task in listed:
        resolve, _, fileuri = str(task["data"]["image"]).partition("?fileuri=")
        assert resolve == f"/tasks/{task['id']}/resolve/", task["data"]
        raw[task["id"]] = base64.urlsafe_b64decode(fileuri).decode()
    assert sorted(raw.values()) == sorted(images)
    tasks = [{"id": t["id"], "data": {**t["data"], "image": raw[t["id"]]}} for t in listed]

    # what Label Studio's resolve route answers for this storage
    uri = next(iter(images))
    answer = httpx.get(
        presign_url(label_studio.url, project_id, uri),
        headers=label_studio.auth_headers,
        follow_redirects=False,
        timeout=60,
    )
    if presign:
        assert answer.status_code == 303, answer.text[:300]
        location = answer.headers["location"]
        assert location.startswith(moto_s3.url) and "X-Amz-Signature=" in location
        assert httpx.get(location, timeout=30).content == images[uri]  # signed: no token needed
        assert httpx.get(location.split("?")[0], timeout=30).status_code == 403  # private
    else:
        assert answer.status_code == 200, answer.text[:300]
        assert answer.content == images[uri]

    settings = Settings(
        data_dir=tmp_path / "data",
        label_studio_url=label_studio.url,
        label_studio_token=label_studio.token,
        reconcile_on_startup=False,
        train_after_new_annotations=1000,
    )
    service = BoxloopService(settings)
    try:
        service.setup(project_id, config)
        # the tasks as Label Studio sends them to /predict, and as its task API lists them
        for form in (tasks, listed):
            payload = [{"id": t["id"], "data": t["data"], "project": project_id} for t in form]
            predictions = service.predict(payload, None, project_id)
            assert [(p.task_id, p.error) for p in predictions] == [(t["id"], None) for t in form]

        source = service.studio.image_source_of(project_id)
        for task in [*tasks, *listed]:
            expected = Image.open(io.BytesIO(images[raw[task["id"]]])).convert("RGB")
            loaded = load_image(task["data"]["image"], source)
            assert np.array_equal(np.asarray(loaded), np.asarray(expected))
        # a URI no storage of the project covers: Label Studio's 404, said as such
        with pytest.raises(ImageNotFound, match="no cloud storage of the project holds that URI"):
            load_image("s3://no-such-bucket/img_0.png", source)
    finally:
        service.close()


def test_label_studio_retrieves_predictions_of_s3_tasks_from_a_running_boxloop(
    label_studio: LabelStudioServer, moto_s3: MotoS3, start_boxloop: StartBoxloop
) -> None:
    """The whole path: Label Studio's "Retrieve predictions" calls a ``boxloop serve`` with the
    task data as it sends it, and every task gets boxloop's prediction (an image boxloop could
    not read would get none and leave an error in its log)."""
    project_id, _config, images = _s3_project(label_studio, moto_s3, presign=True)
    server = start_boxloop()
    connect_backend(label_studio, project_id, server.url)
    retrieve_predictions(label_studio, project_id)
    stored = task_predictions(label_studio, project_id)
    assert len(stored) == len(images)
    assert all(len(predictions) == 1 for predictions in stored.values()), stored
    log = server.log_tail(400)
    assert "unsupported URL scheme" not in log and "ImageForbidden" not in log, log
