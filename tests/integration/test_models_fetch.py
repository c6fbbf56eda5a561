"""``boxloop models fetch`` against a local HTTP server serving the shared YOLOX-Nano copy.

The fetched model must land in ``<data_dir>/models/yolox_nano_coco/``, verify, and serve: a
detector built from settings with only that data dir (no ``onnx_model_path``) finds a person and
a dog in VOC images, through ``build_detector_for`` and through the HTTP app. Wrong answers
(an HTML page, a truncated body or file, another ONNX model, a 404) exit nonzero with a clear
message and leave nothing behind.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from backend.app import create_app
from backend.cli import main
from backend.detectors import OnnxYoloxDetector, build_detector_for, map_class_names
from backend.model_fetch import COCO_CLASSES, ModelFetchError, verify_onnx_model
from backend.settings import DEFAULT_MODEL_URL, Settings, load_settings
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.shared_data

VOC_LABELS = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip


def _wrong_model_bytes() -> bytes:
    """A valid ONNX model over 1 MiB whose output is not a YOLOX COCO head."""
    padding = numpy_helper.from_array(np.zeros(400_000, dtype=np.float32), "padding")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["output"])],
        "not_yolox",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 416, 416])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 1, 1])],
        initializer=[padding],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class _Server:
    """Serves the model and the wrong answers at fixed paths; counts requests."""

    def __init__(self, model: bytes) -> None:
        self.model = model
        self.hits: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def _send(self, status: int, body: bytes, content_type: str, length: int) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                owner.hits.append(self.path)
                model = owner.model
                octet = "application/octet-stream"
                if self.path == "/download/yolox_nano.onnx":  # like GitHub: a redirect first
                    self.send_response(302)
                    self.send_header("Location", "/assets/yolox_nano.onnx")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/assets/yolox_nano.onnx":
                    self._send(200, model, octet, len(model))
                elif self.path == "/html":
                    page = b"<!DOCTYPE html><html><body><h1>Sign in to continue</h1></body></html>"
                    self._send(200, page, "text/html; charset=utf-8", len(page))
                elif self.path == "/html-as-octet-stream":
                    page = b"\n<!DOCTYPE html>\n<html><body>Rate limit exceeded</body></html>\n"
                    self._send(200, page, octet, len(page))
                elif self.path == "/cut-connection":  # announces the full size, sends half
                    self._send(200, model[: len(model) // 2], octet, len(model))
                    self.close_connection = True
                elif self.path == "/truncated-file":  # a consistent response, half a model
                    half = model[: len(model) // 2]
                    self._send(200, half, octet, len(half))
                elif self.path == "/gzip-mirror":  # compresses for whoever accepts gzip
                    accepted = self.headers.get("Accept-Encoding", "")
                    if "gzip" in accepted:
                        packed = gzip.compress(model)
                        self.send_response(200)
                        self.send_header("Content-Type", octet)
                        self.send_header("Content-Encoding", "gzip")
                        self.send_header("Content-Length", str(len(packed)))
                        self.end_headers()
                        self.wfile.write(packed)
                    else:
                        self._send(200, model, octet, len(model))
                elif self.path == "/wrong-model":
                    body = _wrong_model_bytes()
                    self._send(200, body, octet, len(body))
                else:
                    body = b"Not Found"
                    self._send(404, body, "text/plain", len(body))

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def server(onnx_path: Path) -> Iterator[_Server]:
    srv = _Server(onnx_path.read_bytes())
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    monkeypatch.setenv("BOXLOOP_DATA_DIR", str(data))
    monkeypatch.setenv("BOXLOOP_NUM_THREADS", "1")
    for key in ("BOXLOOP_ONNX_MODEL_PATH", "BOXLOOP_ONNX_CLASS_NAMES_PATH", "BOXLOOP_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(key, raising=False)
    return data


def _voc_image(shared_data: Path, name: str) -> Path:
    voc = shared_data / "voc" / "VOCdevkit" / "VOC2012"
    for xml in sorted((voc / "Annotations").glob("*.xml")):
        if f"<name>{name}</name>" in xml.read_text():
            return voc / "JPEGImages" / f"{xml.stem}.jpg"
    pytest.skip(f"no VOC image with a {name} under {voc}")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_settings_resolve_fetched_model(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    assert settings.model_url == DEFAULT_MODEL_URL
    assert settings.fetched_onnx_model_path == (
        tmp_path / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    )
    assert settings.resolved_onnx_model_path is None
    settings.fetched_onnx_model_path.parent.mkdir(parents=True)
    settings.fetched_onnx_model_path.write_bytes(b"x")
    assert settings.resolved_onnx_model_path == settings.fetched_onnx_model_path
    explicit = load_settings(data_dir=tmp_path, onnx_model_path=tmp_path / "mine.onnx")
    assert explicit.resolved_onnx_model_path == tmp_path / "mine.onnx"  # the setting wins


def test_coco_class_names_match_shared_copy(onnx_path: Path) -> None:
    """The names written beside the fetched model mean the same classes, in the same order, as
    the shared copy's (which uses VOC spellings such as ``motorbike``/``tvmonitor``)."""
    shared = [n.strip() for n in (onnx_path.parent / "coco_classes.txt").read_text().split("\n")]
    shared = [n for n in shared if n]
    assert len(COCO_CLASSES) == len(shared) == 80
    assert map_class_names(list(COCO_CLASSES), shared) == {i: i for i in range(80)}
    assert map_class_names(list(COCO_CLASSES), VOC_LABELS) == map_class_names(shared, VOC_LABELS)


def test_fetch_installs_verified_model_that_serves(
    server: _Server, data_dir: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.url("/download/yolox_nano.onnx")
    assert main(["models", "fetch", "--url", url, "--quiet"]) == 0
    installed = json.loads(capsys.readouterr().out)
    target = data_dir / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    assert installed["installed"] == str(target)
    assert server.hits[-2:] == ["/download/yolox_nano.onnx", "/assets/yolox_nano.onnx"]
    assert _files(data_dir) == [
        "models",
        "models/yolox_nano_coco",
        "models/yolox_nano_coco/coco_classes.txt",
        "models/yolox_nano_coco/yolox_nano.onnx",
    ]
    assert target.read_bytes() == server.model
    names = (target.parent / "coco_classes.txt").read_text().splitlines()
    assert names == list(COCO_CLASSES)
    info = verify_onnx_model(target)
    assert info.input_size == (416, 416) and info.output_shape == (1, 3549, 85)

    # A second fetch keeps the verified file and does not download again.
    hits = len(server.hits)
    assert main(["models", "fetch", "--url", url, "--quiet"]) == 0
    assert len(server.hits) == hits
    assert "already present and verified" in capsys.readouterr().err

    assert main(["models", "status", "--verify"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["source"] == "fetched" and status["serving"] == str(target)
    assert status["verified"] is True

    # Settings with only the data dir (no onnx_model_path) serve the fetched model.
    settings = Settings(data_dir=data_dir, score_threshold=0.3)
    assert settings.onnx_model_path is None
    assert settings.resolved_onnx_model_path == target
    detector = build_detector_for(settings, ["person", "dog"])
    assert isinstance(detector, OnnxYoloxDetector)
    assert detector.version == "pretrained-yolox_nano"
    for label, index in (("person", 0), ("dog", 1)):
        image_path = _voc_image(shared_data, label)
        with Image.open(image_path) as image:
            (boxes,) = detector.predict([image.convert("RGB")])
        assert len(boxes) > 0, f"no box on {image_path.name}"
        assert index in boxes.labels.tolist(), f"no {label} on {image_path.name}"
        assert boxes.scores is not None and float(boxes.scores.max()) >= 0.3

    # And through the HTTP app (the service's pre-training model).
    voc = _voc_image(shared_data, "person")
    app_settings = Settings(
        data_dir=data_dir, allowed_local_roots=[voc.parent], reconcile_on_startup=False
    )
    config = (
        '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
        '<Label value="person"/><Label value="dog"/></RectangleLabels></View>'
    )
    with TestClient(create_app(app_settings)) as client:
        answer = client.post(
            "/predict",
            json={"tasks": [{"id": 1, "data": {"image": str(voc)}}], "label_config": config},
        )
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    assert result["model_version"] == "pretrained-yolox_nano"
    assert any(r["value"]["rectanglelabels"] == ["person"] for r in result["result"])


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/html", "text/html page, not a model file"),
        ("/html-as-octet-stream", "is an HTML/XML page"),
        ("/cut-connection", "broke off (truncated)"),
        ("/truncated-file", "not a valid ONNX model (truncated download or wrong file?)"),
        ("/wrong-model", "is not a YOLOX COCO head"),
        ("/missing.onnx", "answered HTTP 404 Not Found"),
    ],
)
def test_fetch_rejects_wrong_answers_and_leaves_nothing(
    server: _Server, data_dir: Path, capsys: pytest.CaptureFixture[str], path: str, message: str
) -> None:
    assert main(["models", "fetch", "--url", server.url(path), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert message in captured.err, captured.err
    assert "nothing was installed" in captured.err
    assert captured.out == ""
    assert _files(data_dir) == []  # no partial file, not even an empty directory
    assert Settings(data_dir=data_dir).resolved_onnx_model_path is None


def test_failed_forced_fetch_keeps_the_installed_model(
    server: _Server, data_dir: Path, onnx_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "fetch", "--url", str(onnx_path), "--quiet"]) == 0  # a local path
    target = Settings(data_dir=data_dir).fetched_onnx_model_path
    before = _files(data_dir)
    assert main(["models", "fetch", "--force", "--url", server.url("/html"), "--quiet"]) == 1
    assert _files(data_dir) == before and target.read_bytes() == server.model
    assert "text/html" in capsys.readouterr().err


def test_verify_rejects_wrong_model_even_without_size_bound(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.onnx"
    wrong.write_bytes(_wrong_model_bytes())
    with pytest.raises(ModelFetchError, match=r"output shape \(1, 3, 1, 1\)"):
        verify_onnx_model(wrong, min_bytes=0)
    tiny = tmp_path / "tiny.onnx"
    tiny.write_bytes(b"\x08\x07")
    with pytest.raises(ModelFetchError, match="bytes; a YOLOX ONNX model has between"):
        verify_onnx_model(tiny)


def test_cli_subprocess_exit_code_on_404(server: _Server, tmp_path: Path) -> None:
    """The installed ``boxloop`` entry point: nonzero exit, one clear error line, no files."""
    env = {
        k: v for k, v in os.environ.items() if not k.lower().endswith("proxy") or k == "no_proxy"
    }
    env["BOXLOOP_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run(
        [sys.executable, "-m", "backend.cli", "models", "fetch", "--url", server.url("/nope")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "boxloop models fetch: error:" in proc.stderr and "HTTP 404" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_a_sha256_pin_refuses_another_file_and_refetches_a_mismatched_install(
    server: _Server, data_dir: Path, onnx_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.url("/download/yolox_nano.onnx")
    digest = hashlib.sha256(server.model).hexdigest()
    wrong_pin = "0" * 64
    assert main(["models", "fetch", "--url", url, "--quiet", "--sha256", wrong_pin]) == 1
    err = capsys.readouterr().err
    assert f"has sha256 {digest}, not the pinned {wrong_pin}" in err
    assert _files(data_dir) == []
    assert main(["models", "fetch", "--url", url, "--quiet", "--sha256", "xyz"]) == 1
    assert "is not 64 hex digits" in capsys.readouterr().err

    assert main(["models", "fetch", "--url", url, "--quiet", "--sha256", digest.upper()]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == digest
    target = Settings(data_dir=data_dir).fetched_onnx_model_path
    assert target.read_bytes() == server.model

    # An installed model with another digest than the pin is fetched again, and the fetch
    # fails (nothing changes) when the source has the other digest too.
    hits = len(server.hits)
    assert main(["models", "fetch", "--url", url, "--quiet", "--sha256", wrong_pin]) == 1
    err = capsys.readouterr().err
    assert "fetching it again" in err and "not the pinned" in err
    assert len(server.hits) > hits and target.read_bytes() == server.model


def test_a_mirror_that_gzips_serves_the_file_itself(server: _Server, data_dir: Path) -> None:
    """httpx asks for gzip by default, and the raw stream then held the compressed bytes: a good
    model from such a mirror was refused as "not a valid ONNX model"."""
    assert main(["models", "fetch", "--url", server.url("/gzip-mirror"), "--quiet"]) == 0
    assert Settings(data_dir=data_dir).resolved_onnx_model_path is not None


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "soon"])
def test_a_timeout_that_is_no_duration_is_refused(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """-1 and nan ended in a traceback from httpx, 0 in "could not connect (no internet?)"."""
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "fetch", "--timeout", timeout])
    assert exit_info.value.code == 2
    assert "seconds above 0" in capsys.readouterr().err


def test_a_model_path_setting_that_names_no_file_is_said_not_skipped(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--if-missing`` took the setting for a present model and skipped the fetch; a fetch
    without it installed a model the setting then overrode."""
    monkeypatch.setenv("BOXLOOP_ONNX_MODEL_PATH", str(data_dir / "nowhere.onnx"))
    for flags in (["--if-missing"], []):
        assert main(["models", "fetch", "--quiet", *flags]) == 1
        assert "nowhere.onnx, which is no file" in capsys.readouterr().err
    assert _files(data_dir) == []


def _dockerfile_script(name: str) -> str:
    """The file docker/Dockerfile writes to /usr/local/bin/<name> (a ``COPY <<"EOF"`` heredoc)."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    match = re.search(rf'^COPY [^\n]*<<"EOF" /usr/local/bin/{name}\n(.*?)^EOF$', text, re.S | re.M)
    assert match is not None, f"docker/Dockerfile writes no /usr/local/bin/{name}"
    assert f'ENTRYPOINT ["{name}"]' in text
    return match.group(1)


def _run_entrypoint(tmp_path: Path, env: dict[str, str], *command: str) -> tuple[str, str]:
    """Run the image's entrypoint with the real ``boxloop models`` and a ``boxloop serve`` that
    only says it started; its stdout and stderr."""
    entrypoint = tmp_path / "boxloop-entrypoint"
    entrypoint.write_text(_dockerfile_script("boxloop-entrypoint"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "boxloop").write_text(
        f'#!/bin/sh\n[ "$1" = models ] && exec {sys.executable} -m backend.cli "$@"\n'
        'echo "started: $*"\n'
    )
    (bin_dir / "boxloop").chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BOXLOOP_")}
    clean.update(PATH=f"{bin_dir}:{clean['PATH']}", PYTHONPATH=str(REPO), **env)
    proc = subprocess.run(
        ["sh", str(entrypoint), *command],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def test_the_docker_image_fetches_the_model_on_start_and_serves_without_it(
    tmp_path: Path, onnx_path: Path
) -> None:
    """The image never fetched the model, so with the default detector every training job
    failed; a start without network must still serve, saying why nothing trains."""
    data = tmp_path / "data"
    env = {"BOXLOOP_DATA_DIR": str(data), "BOXLOOP_MODEL_URL": f"http://127.0.0.1:{free_port()}/m"}
    out, err = _run_entrypoint(tmp_path, env, "boxloop", "serve")
    assert out == "started: serve\n"
    assert "could not fetch the COCO YOLOX-Nano model" in err and "training" in err
    assert not Settings(data_dir=data).fetched_onnx_model_path.exists()

    env["BOXLOOP_MODEL_URL"] = str(onnx_path)
    out, err = _run_entrypoint(tmp_path, env, "boxloop", "serve")
    assert out == "started: serve\n" and "could not fetch" not in err
    fetched = Settings(data_dir=data).fetched_onnx_model_path
    assert fetched.read_bytes() == onnx_path.read_bytes()
    out, err = _run_entrypoint(tmp_path, env, "boxloop", "serve")  # the next start: kept
    assert "nothing to fetch" in err and "fetching" not in err
    out, err = _run_entrypoint(tmp_path, env, "boxloop", "status")  # other commands: as given
    assert out == "started: status\n" and err == ""
