"""Fetch and verify the COCO YOLOX-Nano ONNX model that pre-annotates before a project's first training.

``boxloop models fetch`` downloads the official release asset (``settings.model_url``, by default
Megvii-BaseDetection/YOLOX release 0.1.1rc0 ``yolox_nano.onnx``) into
``<data_dir>/models/yolox_nano_coco/yolox_nano.onnx`` and writes the 80 COCO class names beside it
(``coco_classes.txt``). When ``BOXLOOP_ONNX_MODEL_PATH`` is not set, the backend serves that file
(:attr:`backend.settings.Settings.resolved_onnx_model_path`).

The download streams to a temporary file in the target directory and is renamed into place only
after it verified: size within bounds, loads as ONNX and passes ``onnx.checker``, one input
``1×3×H×W`` (H, W multiples of 32), and on a blank image onnxruntime gives an output
``(1, A, 85)`` with ``A`` the anchor points of strides 8/16/32 (a YOLOX COCO head). A wrong file (an
HTML error page, a truncated download, another model) raises :class:`ModelFetchError` and leaves
nothing behind; an existing model is kept.

With a pin (``--sha256`` or ``BOXLOOP_MODEL_SHA256``) the file must also have that sha256, and an
installed model with another digest is fetched again. There is no default pin: this machine
cannot reach the release to read its digest, and a pin nobody checked would refuse the real file.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backend.settings import DEFAULT_MODEL_URL, Settings

__all__ = [
    "COCO_CLASSES",
    "DEFAULT_MODEL_URL",
    "MAX_MODEL_BYTES",
    "MIN_MODEL_BYTES",
    "ModelFetchError",
    "ModelInfo",
    "fetch_model",
    "model_status",
    "verify_onnx_model",
]

#: The 80 COCO classes in YOLOX's output order (``yolox/data/datasets/coco_classes.py``).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

#: Size bounds of a plausible YOLOX COCO ONNX file (Nano: 3.5 MiB; X: ~380 MiB).
MIN_MODEL_BYTES = 1 << 20
MAX_MODEL_BYTES = 512 << 20

_STRIDES = (8, 16, 32)
_CHUNK = 1 << 16
_PAD_VALUE = 114.0


class ModelFetchError(RuntimeError):
    """The model could not be fetched, or the file is not the expected YOLOX COCO ONNX model."""


@dataclass(frozen=True)
class ModelInfo:
    """What verification found out about a model file."""

    path: str
    bytes: int
    sha256: str
    input_name: str
    input_size: tuple[int, int]
    output_shape: tuple[int, ...]
    num_classes: int


def _looks_like_html(head: bytes) -> bool:
    text = head.lstrip()[:512].lower()
    return text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) or (
        b"<html" in text
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_onnx_model(
    path: Path,
    *,
    num_classes: int = len(COCO_CLASSES),
    min_bytes: int = MIN_MODEL_BYTES,
    max_bytes: int = MAX_MODEL_BYTES,
    name: str | None = None,
) -> ModelInfo:
    """Check that ``path`` is a YOLOX ONNX detector for ``num_classes`` classes; else raise.

    ``name`` is how error messages call the file (default: its path).

    Checks, in order: not an HTML/XML page; size within ``[min_bytes, max_bytes]``; ``onnx.load``
    and ``onnx.checker``; exactly one graph input of static shape ``1×3×H×W`` (float, H and W
    multiples of 32); onnxruntime output ``(1, A, 5 + num_classes)`` on a blank image, with
    ``A = Σ (H/s)(W/s)`` over the strides 8, 16, 32, all finite.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    path = Path(path)
    what = name or str(path)
    if not path.is_file():
        raise ModelFetchError(f"{what}: no such file")
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(1024)
    if _looks_like_html(head):
        raise ModelFetchError(
            f"{what} is an HTML/XML page ({size} bytes), not an ONNX model: the URL probably "
            "points at a web page or an error page, not at the release asset"
        )
    if not min_bytes <= size <= max_bytes:
        raise ModelFetchError(
            f"{what} has {size} bytes; a YOLOX ONNX model has between {min_bytes} and "
            f"{max_bytes} (truncated download or wrong file?)"
        )
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelFetchError(
            f"{what} is not a valid ONNX model (truncated download or wrong file?): "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from exc

    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelFetchError(
            f"{what} has {len(inputs)} inputs ({[i.name for i in inputs]}); a YOLOX detector has one"
        )
    tensor_type = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if (
        len(dims) != 4
        or dims[:2] != [1, 3]
        or any(d is None or d <= 0 or d % 32 for d in dims[2:])
        or tensor_type.elem_type != onnx.TensorProto.FLOAT
    ):
        shape = [d if d is not None else "?" for d in dims]
        raise ModelFetchError(
            f"{what}: input {inputs[0].name!r} has shape {shape} "
            f"({onnx.TensorProto.DataType.Name(tensor_type.elem_type)}); expected float "
            "1×3×H×W with H, W fixed multiples of 32"
        )
    height, width = int(dims[2]), int(dims[3])  # type: ignore[arg-type]
    del model

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: a wrong model's warnings are not the message
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        blank = np.full((1, 3, height, width), _PAD_VALUE, dtype=np.float32)
        outputs = session.run(None, {inputs[0].name: blank})
    except Exception as exc:
        raise ModelFetchError(
            f"{what}: onnxruntime could not run the model on a blank image: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    out = np.asarray(outputs[0])
    anchors = sum((height // s) * (width // s) for s in _STRIDES)
    expected = (1, anchors, 5 + num_classes)
    if out.shape != expected:
        raise ModelFetchError(
            f"{what}: output shape {out.shape} is not a YOLOX COCO head; expected {expected} "
            f"(strides {_STRIDES} at input {height}×{width}, {num_classes} classes)"
        )
    if not np.isfinite(out).all():
        raise ModelFetchError(f"{what}: the output on a blank image is not finite")
    return ModelInfo(
        path=str(path),
        bytes=size,
        sha256=_sha256(path),
        input_name=inputs[0].name,
        input_size=(height, width),
        output_shape=tuple(int(d) for d in out.shape),
        num_classes=num_classes,
    )


# ------------------------------------------------------------------------------------ download
def _local_source(url: str) -> Path | None:
    """The file a ``file://`` URL or a plain path names; ``None`` for other URLs."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if not parsed.scheme:
        return Path(url)
    return None


@contextmanager
def _progress(total: int | None, desc: str, quiet: bool) -> Iterator[Any]:
    from tqdm import tqdm

    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        disable=True if quiet else None,  # None: only on a terminal
        leave=False,
    ) as bar:
        yield bar


def _download(url: str, dest: Path, *, timeout_s: float, quiet: bool) -> None:
    """Stream ``url`` into the open-for-write path ``dest``; raise :class:`ModelFetchError`."""
    local = _local_source(url)
    if local is not None:
        if not local.is_file():
            raise ModelFetchError(f"{local}: no such file")
        total = local.stat().st_size
        if total > MAX_MODEL_BYTES:
            raise ModelFetchError(f"{local} has {total} bytes, more than {MAX_MODEL_BYTES}")
        with (
            local.open("rb") as src,
            dest.open("wb") as out,
            _progress(total, dest.name, quiet) as bar,
        ):
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                out.write(chunk)
                bar.update(len(chunk))
        return

    import httpx

    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 15.0))
    try:
        # identity: the bytes on the wire are the file's (a mirror that gzips them would fail the
        # size and format checks of the raw stream)
        headers = {"Accept-Encoding": "identity"}
        with httpx.stream(
            "GET", url, follow_redirects=True, timeout=timeout, headers=headers
        ) as response:
            if response.status_code != 200:
                raise ModelFetchError(
                    f"{url} answered HTTP {response.status_code} {response.reason_phrase}"
                    + (f" (after redirects, at {response.url})" if response.history else "")
                )
            content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type.startswith("text/") or content_type in (
                "application/xhtml+xml",
                "application/json",
            ):
                raise ModelFetchError(
                    f"{url} answered with a {content_type} page, not a model file: the URL "
                    "probably points at a web page or an error page, not at the release asset"
                )
            length_header = response.headers.get("content-length")
            announced = int(length_header) if length_header and length_header.isdigit() else None
            if announced is not None and announced > MAX_MODEL_BYTES:
                raise ModelFetchError(
                    f"{url} announces {announced} bytes, more than a YOLOX model "
                    f"({MAX_MODEL_BYTES})"
                )
            received = 0
            with dest.open("wb") as out, _progress(announced, dest.name, quiet) as bar:
                for chunk in response.iter_raw(_CHUNK):
                    received += len(chunk)
                    if received > MAX_MODEL_BYTES:
                        raise ModelFetchError(f"{url} sent more than {MAX_MODEL_BYTES} bytes")
                    out.write(chunk)
                    bar.update(len(chunk))
            if announced is not None and received != announced:
                raise ModelFetchError(
                    f"truncated download from {url}: got {received} of {announced} bytes"
                )
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as exc:
        raise ModelFetchError(
            f"could not connect to {url}: {type(exc).__name__}: {exc or 'no detail'} "
            "(no internet access? pass --url with a reachable URL or a local file)"
        ) from exc
    except httpx.HTTPError as exc:
        raise ModelFetchError(
            f"the download from {url} broke off (truncated): {type(exc).__name__}: "
            f"{exc or 'no detail'}; try again"
        ) from exc


def _mkdirs(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; return the ones created, deepest first."""
    created: list[Path] = []
    current = directory
    while not current.exists():
        created.append(current)
        current = current.parent
    directory.mkdir(parents=True, exist_ok=True)
    return created


def fetch_model(
    settings: Settings,
    url: str | None = None,
    *,
    force: bool = False,
    timeout_s: float = 60.0,
    quiet: bool = False,
    sha256: str | None = None,
    log: Any = None,
) -> ModelInfo:
    """Download, verify and install the YOLOX model into ``settings.fetched_onnx_model_path``.

    ``url`` defaults to ``settings.model_url``; ``file://`` URLs and plain paths are copied. An
    existing model that verifies is kept unless ``force``. On any error nothing new is left on
    disk (no partial file, no new empty directory) and :class:`ModelFetchError` is raised.
    ``sha256`` (default ``settings.model_sha256``) pins the file's digest.
    """
    say = log or (lambda message: print(message, file=sys.stderr))
    url = url or settings.model_url
    pin = _normalised_pin(sha256 or settings.model_sha256)
    target = settings.fetched_onnx_model_path
    names_path = target.parent / "coco_classes.txt"
    if target.is_file() and not force:
        try:
            info = verify_onnx_model(target)
            if pin is not None and info.sha256 != pin:
                raise ModelFetchError(f"its sha256 {info.sha256} is not the pinned {pin}")
        except ModelFetchError as exc:
            say(f"the model already at {target} does not verify ({exc}); fetching it again")
        else:
            if not names_path.is_file():
                try:
                    _write_atomic_text(names_path, "\n".join(COCO_CLASSES) + "\n")
                except OSError as exc:
                    raise ModelFetchError(_cannot_write(target.parent, exc)) from exc
            say(f"{target} is already present and verified (use --force to fetch it again)")
            return info

    try:
        created = _mkdirs(target.parent)
    except OSError as exc:
        raise ModelFetchError(_cannot_write(target.parent, exc)) from exc
    tmp_model: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part"
        )
        os.close(fd)
        tmp_model = Path(tmp_name)
        say(f"fetching {url} -> {target}")
        _download(url, tmp_model, timeout_s=timeout_s, quiet=quiet)
        info = verify_onnx_model(tmp_model, name=f"the file from {url}")
        if pin is not None and info.sha256 != pin:
            raise ModelFetchError(
                f"the file from {url} has sha256 {info.sha256}, not the pinned {pin} "
                "(another release, or a tampered or corrupted download)"
            )
        _write_atomic_text(names_path, "\n".join(COCO_CLASSES) + "\n")
        os.chmod(tmp_model, 0o644)
        os.replace(tmp_model, target)
        tmp_model = None
    except BaseException as exc:
        if tmp_model is not None:
            tmp_model.unlink(missing_ok=True)
        for directory in created:  # deepest first; only the ones this call made, if still empty
            try:
                directory.rmdir()
            except OSError:
                break
        if isinstance(exc, OSError):
            raise ModelFetchError(_cannot_write(target.parent, exc)) from exc
        raise
    say(
        f"verified and installed {target} ({info.bytes} bytes, sha256 {info.sha256[:16]}…, "
        f"input {info.input_size[0]}×{info.input_size[1]}, output {info.output_shape})"
    )
    return ModelInfo(**{**asdict(info), "path": str(target)})


def _cannot_write(directory: Path, exc: OSError) -> str:
    """One line for an ``OSError`` while installing into ``directory`` (a data dir under a
    file, no permission, a full disk, an unreadable source file): the CLI shows it as a
    :class:`ModelFetchError`, not a traceback."""
    named = exc.filename is not None and str(exc.filename) != str(directory)
    where = f": {exc.filename}" if named else ""
    return f"cannot install the model into {directory}: {exc.strerror or exc}{where}"


def _normalised_pin(pin: str | None) -> str | None:
    if pin is None or not pin.strip():
        return None
    pin = pin.strip().lower()
    if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
        raise ModelFetchError(f"the sha256 pin {pin!r} is not 64 hex digits")
    return pin


def _write_atomic_text(path: Path, text: str) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def model_status(settings: Settings, *, verify: bool = False) -> dict[str, Any]:
    """Which ONNX model pre-annotates before training, and where it comes from."""
    fetched = settings.fetched_onnx_model_path
    resolved = settings.resolved_onnx_model_path
    if settings.onnx_model_path is not None:
        source = "BOXLOOP_ONNX_MODEL_PATH"
    elif resolved is not None:
        source = "fetched"
    else:
        source = None
    status: dict[str, Any] = {
        "serving": str(resolved) if resolved is not None else None,
        "source": source,
        "onnx_model_path": str(settings.onnx_model_path) if settings.onnx_model_path else None,
        "fetched_model": str(fetched),
        "fetched_present": fetched.is_file(),
        "model_url": settings.model_url,
    }
    if resolved is None:
        status["note"] = (
            "no pre-annotation before the first training, and training the default detector "
            "(yolox_nano, which starts from this model) fails; run `boxloop models fetch` "
            "(or set BOXLOOP_ONNX_MODEL_PATH)"
        )
    if verify and resolved is not None:
        try:
            info = verify_onnx_model(resolved)
        except ModelFetchError as exc:
            status["verified"] = False
            status["error"] = str(exc)
        else:
            status["verified"] = True
            status["info"] = asdict(info)
    return status
