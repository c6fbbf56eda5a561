"""Fixtures that run a real Label Studio (and a real boxloop server) for end-to-end tests.

Why real servers: the behaviours that break ML backends (token forms, how images are served,
which calls are synchronous, what Label Studio validates) are Label Studio's, and change between
versions; a fake would encode our assumptions instead of testing them.

Label Studio 1.23.2 lives in its own venv (``scripts/labelstudio.sh install``, cached in
``.venv-labelstudio/``). The only reason to skip is that this venv cannot be installed because
PyPI is unreachable; every other problem is a failure.

Fixtures
    ``label_studio`` (session): a running :class:`LabelStudioServer`.
    ``image_project`` (function): a fresh RectangleLabels project over real images, tasks
    imported through local storage, as an :class:`ImageProject`.
    ``start_boxloop`` (function): a factory that starts ``boxloop serve`` subprocesses.
    ``boxloop_server`` (function): one boxloop server wired to ``label_studio``.

Helpers (plain functions, ``from tests.e2e.conftest import ...``): :func:`create_image_project`,
:func:`connect_backend`, :func:`start_training`, :func:`retrieve_predictions`,
:func:`task_predictions`, :func:`submit_annotation`, :func:`update_annotation`,
:func:`delete_annotation`, :func:`ground_truth_result`, :func:`label_config_for`,
:func:`wait_for`.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from xml.sax.saxutils import quoteattr

import httpx
import pytest
from label_studio_sdk import LabelStudio

from backend.labelstudio.client import StudioClient
from tests.conftest import free_port, shared_data_dir

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
LABEL_STUDIO_SCRIPT = REPO_ROOT / "scripts" / "labelstudio.sh"
#: First start runs all migrations: 32–44 s seen on 2 shared cores; leave room for a busy box.
LABEL_STUDIO_START_TIMEOUT_S = float(os.environ.get("BOXLOOP_E2E_LS_START_TIMEOUT", "240"))
BOXLOOP_START_TIMEOUT_S = float(os.environ.get("BOXLOOP_E2E_BACKEND_START_TIMEOUT", "180"))
#: Exit code of ``scripts/labelstudio.sh install`` when the package index cannot be reached.
EXIT_PYPI_UNREACHABLE = 3

FROM_NAME = "label"
TO_NAME = "image"
IMAGE_KEY = "image"


# --------------------------------------------------------------------------------- processes
def log_tail(path: Path, lines: int = 80) -> str:
    """The last ``lines`` lines of a log file, for failure reports."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def wait_for_health(
    url: str,
    process: subprocess.Popen[bytes],
    timeout_s: float,
    log_path: Path,
    what: str,
    accept: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
) -> float:
    """Poll ``GET url`` until ``accept`` says yes; fail early if the process died.

    Returns the seconds it took, which the tests print so slow starts are visible.
    """
    started = time.monotonic()
    last_error = "no answer yet"
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"{what} exited with code {process.returncode} before {url} answered.\n"
                f"--- log tail ({log_path}) ---\n{log_tail(log_path)}",
                pytrace=False,
            )
        try:
            response = httpx.get(url, timeout=2.0)
            if accept(response):
                return time.monotonic() - started
            last_error = f"HTTP {response.status_code}: {response.text[:200]}"
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: a 200 that is not JSON yet
            last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() - started > timeout_s:
            stop_process(process)
            pytest.fail(
                f"{what} did not answer {url} within {timeout_s:.0f} s (last: {last_error}).\n"
                f"--- log tail ({log_path}) ---\n{log_tail(log_path)}",
                pytrace=False,
            )
        time.sleep(0.5)


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        process.wait(timeout=10)


# --------------------------------------------------------------------------------- Label Studio
@dataclass
class LabelStudioServer:
    """A running Label Studio: where it is, how to authenticate, where its local files live.

    ``token`` is the admin's legacy API token (sent as ``Authorization: Token <token>``).
    ``files_root`` is ``LOCAL_FILES_DOCUMENT_ROOT``: put images under it, then import them with
    a local storage (see :func:`import_local_images`).
    """

    url: str
    token: str
    username: str
    password: str
    files_root: Path
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    client: LabelStudio
    studio: StudioClient
    install_s: float
    start_s: float

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def log_tail(self, lines: int = 80) -> str:
        return log_tail(self.log_path, lines)

    def __repr__(self) -> str:  # keep the token out of pytest's failure output
        return f"LabelStudioServer(url={self.url!r}, files_root={str(self.files_root)!r})"


_running: dict[str, Any] = {}


def install_label_studio() -> float:
    """Run ``scripts/labelstudio.sh install``; skip only if PyPI is unreachable."""
    started = time.monotonic()
    proc = subprocess.run(
        [str(LABEL_STUDIO_SCRIPT), "install"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode == EXIT_PYPI_UNREACHABLE:
        pytest.skip(
            "Label Studio venv cannot be installed: PyPI is unreachable "
            f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no detail'})"
        )
    if proc.returncode != 0:
        pytest.fail(
            f"scripts/labelstudio.sh install failed with code {proc.returncode}:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}",
            pytrace=False,
        )
    return time.monotonic() - started


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """Install (cached) and start Label Studio 1.23.2 on a free port for the whole session."""
    install_s = install_label_studio()
    base = tmp_path_factory.mktemp("label-studio")
    data_dir = base / "data"
    files_root = base / "files"
    files_root.mkdir(parents=True)
    log_path = base / "label-studio.log"
    port = free_port()
    token = "e2e-" + secrets.token_hex(16)
    password = secrets.token_urlsafe(16)
    username = "admin@example.com"
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
    env.update(
        {
            "LABEL_STUDIO_USERNAME": username,
            "LABEL_STUDIO_PASSWORD": password,
            "LABEL_STUDIO_USER_TOKEN": token,
        }
    )
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(LABEL_STUDIO_SCRIPT),
                "start",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                "--files-root",
                str(files_root),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        start_s = wait_for_health(
            f"{url}/health",
            process,
            LABEL_STUDIO_START_TIMEOUT_S,
            log_path,
            "Label Studio",
            accept=lambda r: r.status_code == 200 and r.json().get("status") == "UP",
        )
        server = LabelStudioServer(
            url=url,
            token=token,
            username=username,
            password=password,
            files_root=files_root,
            data_dir=data_dir,
            log_path=log_path,
            process=process,
            client=LabelStudio(base_url=url, api_key=token, timeout=120),
            studio=StudioClient(url, token, timeout_s=120),
            install_s=install_s,
            start_s=start_s,
        )
        print(f"\nLabel Studio up at {url}: install check {install_s:.1f} s, start {start_s:.1f} s")
        _running["label_studio"] = server
        yield server
    finally:
        _running.pop("label_studio", None)
        stop_process(process)


# --------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class GroundTruthBox:
    """One box in pixels (``xmin, ymin, xmax, ymax``, 0-based, exclusive max)."""

    label: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool = False


@dataclass(frozen=True)
class SourceImage:
    """An image file for a project, with its size and ground-truth boxes."""

    path: Path
    width: int
    height: int
    boxes: tuple[GroundTruthBox, ...]


def voc_images(
    n: int, root: Path | None = None, subset: str = "VOCdevkit/VOC2012"
) -> list[SourceImage]:
    """The first ``n`` images of a shared VOC-layout subset (trainval order) with their boxes.

    ``subset`` is the folder under ``voc/`` (``VOCdevkit/VOC2012`` or ``raccoon``). Returns ``[]``
    when the shared data is absent. VOC corners are 1-based inclusive; they are turned into
    0-based pixel edges here so the percent maths downstream stays simple.
    """
    voc = (root or shared_data_dir()) / "voc" / subset
    index = voc / "ImageSets" / "Main" / "trainval.txt"
    if not index.is_file():
        return []
    images: list[SourceImage] = []
    for image_id in index.read_text().split():
        xml_path = voc / "Annotations" / f"{image_id}.xml"
        jpg = voc / "JPEGImages" / f"{image_id}.jpg"
        if not (xml_path.is_file() and jpg.is_file()):
            continue
        tree = ET.parse(xml_path).getroot()
        size = tree.find("size")
        assert size is not None, xml_path
        width, height = int(size.findtext("width", "0")), int(size.findtext("height", "0"))
        boxes = []
        for obj in tree.iter("object"):
            bb = obj.find("bndbox")
            if bb is None:
                continue
            boxes.append(
                GroundTruthBox(
                    label=obj.findtext("name", "").strip(),
                    xmin=float(bb.findtext("xmin", "0")) - 1,
                    ymin=float(bb.findtext("ymin", "0")) - 1,
                    xmax=float(bb.findtext("xmax", "0")),
                    ymax=float(bb.findtext("ymax", "0")),
                    difficult=obj.findtext("difficult", "0").strip() == "1",
                )
            )
        images.append(SourceImage(jpg, width, height, tuple(boxes)))
        if len(images) == n:
            break
    return images


def generated_images(n: int, out_dir: Path, seed: int = 0) -> list[SourceImage]:
    """``n`` synthetic JPEGs (squares and discs on noise) with exact boxes.

    The fallback when the shared data is absent, so the e2e tests still run on a clean checkout.
    """
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n):
        width, height = 320, 240
        img = Image.effect_noise((width, height), 40).convert("RGB")
        draw = ImageDraw.Draw(img)
        boxes = []
        for _ in range(rng.randint(1, 3)):
            side = rng.randint(30, 90)
            x0, y0 = rng.randint(0, width - side - 1), rng.randint(0, height - side - 1)
            label = rng.choice(["square", "disc"])
            color = tuple(rng.randint(0, 255) for _ in range(3))
            shape = (x0, y0, x0 + side, y0 + side)
            if label == "square":
                draw.rectangle(shape, fill=color)
            else:
                draw.ellipse(shape, fill=color)
            boxes.append(GroundTruthBox(label, x0, y0, x0 + side + 1, y0 + side + 1))
        path = out_dir / f"generated_{i:03d}.jpg"
        img.save(path, quality=90)
        images.append(SourceImage(path, width, height, tuple(boxes)))
    return images


def label_config_for(
    labels: Sequence[str],
    from_name: str = FROM_NAME,
    to_name: str = TO_NAME,
    image_key: str = IMAGE_KEY,
) -> str:
    """A RectangleLabels label config over one image, the shape boxloop serves."""
    label_tags = "".join(f"<Label value={quoteattr(label)}/>" for label in labels)
    return (
        "<View>"
        f'<Image name="{to_name}" value="${image_key}"/>'
        f'<RectangleLabels name="{from_name}" toName="{to_name}">{label_tags}</RectangleLabels>'
        "</View>"
    )


# --------------------------------------------------------------------------------- projects
@dataclass
class ImageProject:
    """A Label Studio project with imported image tasks and the boxes we know for them."""

    id: int
    title: str
    labels: list[str]
    label_config: str
    storage_id: int
    storage_dir: Path
    tasks: list[dict[str, Any]]
    images: dict[int, SourceImage] = field(default_factory=dict)
    from_name: str = FROM_NAME
    to_name: str = TO_NAME
    image_key: str = IMAGE_KEY

    @property
    def task_ids(self) -> list[int]:
        return [int(t["id"]) for t in self.tasks]


_project_counter = itertools.count(1)


def import_local_images(
    ls: LabelStudioServer,
    project_id: int,
    storage_dir: Path,
    regex_filter: str = r".*\.(jpe?g|png)$",
) -> tuple[int, list[dict[str, Any]]]:
    """Import every image under ``storage_dir`` (inside ``ls.files_root``) as tasks.

    Local import storage + sync is the only way Label Studio serves files from disk: tasks get
    ``{"image": "/data/local-files/?d=<path relative to files_root>"}``. Returns the storage id
    and the project's tasks (``id`` + ``data``), by id.
    """
    storage = ls.client.import_storage.local.create(
        project=project_id,
        path=str(storage_dir),
        regex_filter=regex_filter,
        use_blob_urls=True,
        title=f"e2e-{storage_dir.name}",
    )
    assert storage.id is not None
    synced = ls.client.import_storage.local.sync(id=storage.id)
    status = getattr(synced, "status", None)
    if status not in (None, "completed"):
        raise AssertionError(f"local storage sync ended as {status!r}: {synced}")
    return storage.id, ls.studio.list_tasks(project_id)


def create_image_project(
    ls: LabelStudioServer,
    n_images: int = 6,
    *,
    title: str | None = None,
    labels: Sequence[str] | None = None,
    images: Sequence[SourceImage] | None = None,
    project_settings: Mapping[str, Any] | None = None,
) -> ImageProject:
    """Create a RectangleLabels project over ``n_images`` real images and import them.

    Images are the shared VOC2012 subset (``$BOXLOOP_SHARED_DATA``) or, when that is absent,
    generated ones. ``labels`` defaults to the classes present in the chosen images (sorted).
    Each project gets its own directory under ``ls.files_root`` and its own local storage.
    """
    number = next(_project_counter)
    title = title or f"e2e boxes {number}"
    storage_dir = ls.files_root / f"project-{number:03d}"
    storage_dir.mkdir(parents=True)
    if images is None:
        images = voc_images(n_images) or generated_images(n_images, ls.files_root / "_generated")
    if len(images) < n_images:
        raise AssertionError(f"asked for {n_images} images, found {len(images)}")
    copied: dict[str, SourceImage] = {}
    for image in images[:n_images]:
        target = storage_dir / image.path.name
        shutil.copyfile(image.path, target)
        copied[target.name] = SourceImage(target, image.width, image.height, image.boxes)
    if labels is None:
        labels = sorted({b.label for img in copied.values() for b in img.boxes})
    config = label_config_for(labels)
    project = ls.client.projects.create(
        title=title, label_config=config, **dict(project_settings or {})
    )
    assert project.id is not None
    storage_id, tasks = import_local_images(ls, project.id, storage_dir)
    by_task: dict[int, SourceImage] = {}
    for task in tasks:
        name = str(task["data"][IMAGE_KEY]).rsplit("/", 1)[-1]
        by_task[int(task["id"])] = copied[name]
    return ImageProject(
        id=project.id,
        title=title,
        labels=list(labels),
        label_config=config,
        storage_id=storage_id,
        storage_dir=storage_dir,
        tasks=tasks,
        images=by_task,
    )


@pytest.fixture
def image_project(label_studio: LabelStudioServer) -> ImageProject:
    """A fresh 6-image RectangleLabels project (VOC images when available)."""
    return create_image_project(label_studio, 6)


def ground_truth_result(
    project: ImageProject, task_id: int, *, include_difficult: bool = True
) -> list[dict[str, Any]]:
    """The task's known boxes as a Label Studio ``result`` (percent of the image), as an
    annotator would submit them. Boxes whose label is not in the project are left out."""
    image = project.images[task_id]
    result = []
    for i, box in enumerate(image.boxes):
        if box.label not in project.labels or (box.difficult and not include_difficult):
            continue
        result.append(
            {
                "id": f"gt{task_id}_{i}",
                "from_name": project.from_name,
                "to_name": project.to_name,
                "type": "rectanglelabels",
                "original_width": image.width,
                "original_height": image.height,
                "image_rotation": 0,
                "value": {
                    "x": 100.0 * box.xmin / image.width,
                    "y": 100.0 * box.ymin / image.height,
                    "width": 100.0 * (box.xmax - box.xmin) / image.width,
                    "height": 100.0 * (box.ymax - box.ymin) / image.height,
                    "rotation": 0,
                    "rectanglelabels": [box.label],
                },
            }
        )
    return result


def submit_annotation(
    ls: LabelStudioServer,
    task_id: int,
    result: list[dict[str, Any]],
    *,
    was_cancelled: bool = False,
    lead_time: float = 1.0,
) -> dict[str, Any]:
    """Create an annotation through the API as the admin (Label Studio sends the webhook)."""
    annotation = ls.client.annotations.create(
        task_id, result=result, was_cancelled=was_cancelled, lead_time=lead_time
    )
    return annotation.model_dump(mode="json", by_alias=True)


def update_annotation(
    ls: LabelStudioServer, annotation_id: int, result: list[dict[str, Any]]
) -> dict[str, Any]:
    """Replace an annotation's result (ANNOTATION_UPDATED webhook)."""
    annotation = ls.client.annotations.update(annotation_id, result=result)
    return annotation.model_dump(mode="json", by_alias=True)


def delete_annotation(ls: LabelStudioServer, annotation_id: int) -> None:
    """Delete an annotation (ANNOTATIONS_DELETED webhook)."""
    ls.client.annotations.delete(annotation_id)


# --------------------------------------------------------------------------------- ML backend
def connect_backend(
    ls: LabelStudioServer,
    project_id: int,
    backend_url: str,
    *,
    title: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Connect an ML backend to the project, as the Model settings page does.

    Label Studio calls the backend's ``/health`` and ``/setup`` before answering, registers a
    webhook ``<backend_url>/webhook`` for all actions, and sets the project's ``model_version``
    to ``title``. ``options`` go to ``ml.create`` (``auth_method``, ``basic_auth_user``, ...).
    """
    kwargs: dict[str, Any] = {"project": project_id, "url": backend_url, "is_interactive": False}
    if title is not None:
        kwargs["title"] = title
    kwargs.update(options)
    backend = ls.client.ml.create(**kwargs)
    return backend.model_dump(mode="json", by_alias=True)


def start_training(ls: LabelStudioServer, backend_id: int) -> None:
    """Press "Start Training" on the project's model: Label Studio POSTs
    ``{"action": "START_TRAINING", "project": {...}}`` to ``<backend>/webhook`` and waits for
    the answer (100 s timeout)."""
    ls.client.ml.train(backend_id, request_options={"timeout": 150, "max_retries": 0})


def wait_for(
    condition: Callable[[], T],
    *,
    timeout_s: float = 300.0,
    interval_s: float = 1.0,
    what: str = "condition",
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    For what the backend does in the background (training, title updates): fails with ``what``
    in the message after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}", pytrace=False)
        time.sleep(interval_s)


def retrieve_predictions(
    ls: LabelStudioServer, project_id: int, task_ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """Data Manager "Retrieve Predictions" on some or all tasks; returns when it is done
    (synchronous without Redis). The answer is like ``{"processed_items": 3, "detail": ...}``."""
    return ls.studio.retrieve_predictions(
        project_id, None if task_ids is None else list(task_ids), timeout_s=600
    )


def task_predictions(ls: LabelStudioServer, project_id: int) -> dict[int, list[dict[str, Any]]]:
    """Every task's stored predictions (``result``, ``score``, ``model_version``), by task id."""
    return {
        int(task["id"]): list(task.get("predictions") or [])
        for task in ls.studio.iter_tasks(project_id, with_annotations=True)
    }


# --------------------------------------------------------------------------------- boxloop
@dataclass
class BoxloopServer:
    """A running ``boxloop serve`` subprocess."""

    url: str
    port: int
    data_dir: Path
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    start_s: float

    def log_tail(self, lines: int = 120) -> str:
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        stop_process(self.process)

    def __repr__(self) -> str:
        return f"BoxloopServer(url={self.url!r}, data_dir={str(self.data_dir)!r})"


def boxloop_executable() -> Path:
    """``boxloop`` from the venv running the tests (falls back to the repo's ``.venv``)."""
    for candidate in (
        Path(sys.executable).parent / "boxloop",
        REPO_ROOT / ".venv" / "bin" / "boxloop",
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "the `boxloop` command is not installed in the test venv: run scripts/setup.sh",
        pytrace=False,
    )


StartBoxloop = Callable[..., BoxloopServer]


@pytest.fixture
def start_boxloop(
    label_studio: LabelStudioServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartBoxloop]:
    """Factory: ``start_boxloop(env={...}, data_dir=None) -> BoxloopServer``.

    Each server gets a free port, its own data dir (unless given: pass the previous one to test
    a restart), ``BOXLOOP_LABEL_STUDIO_URL``/``_TOKEN`` for ``label_studio`` and
    ``BOXLOOP_ALLOWED_LOCAL_ROOTS`` = the Label Studio files root. ``env`` overrides any of them.
    All servers are stopped when the test ends.
    """
    started: list[BoxloopServer] = []

    def start(
        env: Mapping[str, str] | None = None, *, data_dir: Path | None = None
    ) -> BoxloopServer:
        port = free_port()
        data_dir = data_dir or tmp_path_factory.mktemp("boxloop-data")
        log_path = data_dir.parent / f"{data_dir.name}-boxloop-{port}.log"
        server_env = {k: v for k, v in os.environ.items() if not k.startswith("BOXLOOP_")}
        if "BOXLOOP_SHARED_DATA" in os.environ:
            server_env["BOXLOOP_SHARED_DATA"] = os.environ["BOXLOOP_SHARED_DATA"]
        server_env.update(
            {
                "BOXLOOP_DATA_DIR": str(data_dir),
                "BOXLOOP_LABEL_STUDIO_URL": label_studio.url,
                "BOXLOOP_LABEL_STUDIO_TOKEN": label_studio.token,
                "BOXLOOP_ALLOWED_LOCAL_ROOTS": str(label_studio.files_root),
                "BOXLOOP_LOG_LEVEL": "INFO",
                "BOXLOOP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        server_env.update(env or {})
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [str(boxloop_executable()), "serve", "--host", "127.0.0.1", "--port", str(port)],
                cwd=REPO_ROOT,
                env=server_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        start_s = wait_for_health(
            f"{url}/health", process, BOXLOOP_START_TIMEOUT_S, log_path, "boxloop serve"
        )
        server = BoxloopServer(url, port, data_dir, log_path, server_env, process, start_s)
        started.append(server)
        _running.setdefault("boxloop", []).append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
            if server in _running.get("boxloop", []):
                _running["boxloop"].remove(server)


@pytest.fixture
def boxloop_server(start_boxloop: StartBoxloop) -> BoxloopServer:
    """One boxloop server wired to the session's Label Studio."""
    return start_boxloop()


# --------------------------------------------------------------------------------- reporting
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failing e2e test, attach the servers' log tails to the report."""
    report = yield
    if report.failed:
        ls = _running.get("label_studio")
        if ls is not None:
            report.sections.append(("Label Studio log tail", ls.log_tail()))
        for server in _running.get("boxloop", []):
            report.sections.append((f"boxloop log tail ({server.url})", server.log_tail()))
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e is an e2e test, marked or not (so ``-m 'not e2e'`` works)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
