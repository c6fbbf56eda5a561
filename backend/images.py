"""Fetching and decoding task images, with errors that say what went wrong.

Label Studio tasks point at images as ``/data/local-files/?d=...`` or
``/data/upload/...`` (served by Label Studio, need its token), as cloud storage URIs
(``s3://``, ``gs://``, ``azure-blob://``: resolved through Label Studio, see
:func:`presign_url`), as absolute URLs, or as local paths. Fetches go only to the
configured Label Studio host, to the hosts of an explicit allow-list, to the one
presigned URL Label Studio redirects a cloud URI to, or to files under the allowed
local roots: a task -- or a ``/setup`` call naming some ``hostname`` -- cannot make
the backend read arbitrary files or call arbitrary hosts.
"""

from __future__ import annotations

import base64
import io
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlparse

import httpx
import numpy as np
from PIL import Image, ImageOps

# Pillow warns about images over its bomb limit / 2; boxloop refuses images over its own limit
# (BOXLOOP_MAX_IMAGE_PIXELS) right after reading the header, so the warning is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(Exception):
    """An image could not be used; ``status_code`` says whose fault it is."""

    status_code = 422

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ImageNotFound(ImageError):
    status_code = 404


class ImageForbidden(ImageError):
    status_code = 403


class ImageTooLarge(ImageError):
    status_code = 413


class ImageDecodeError(ImageError):
    status_code = 422


class ImageFetchError(ImageError):
    """The image host failed (5xx, timeout): not the caller's fault."""

    status_code = 502


@dataclass(frozen=True)
class ImageSource:
    """Where images may come from, and how to authenticate."""

    label_studio_url: str | None  # base of /data/... paths; the only origin the token goes to
    token: str | None
    allowed_local_roots: tuple[Path, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # more origins absolute image URLs may point at
    max_pixels: int = 40_000_000
    max_bytes: int = 50 * 1024 * 1024
    timeout_s: float = 20.0
    #: The ``Authorization`` header Label Studio wants now (the SDK's: ``Bearer <access>`` for a
    #: personal access token, refreshed when expired); None: ``Token <token>``, a legacy token.
    #: A PAT sent as ``Token`` was refused, so every image of a project failed with a 403.
    auth: Callable[[], dict[str, str]] | None = field(default=None, repr=False, compare=False)
    #: The Label Studio project the images belong to: cloud storage URIs (``s3://...``) are
    #: resolved through that project's storages (:func:`presign_url`).
    project_id: int | None = None

    def __repr__(self) -> str:  # never print the token
        return (
            f"ImageSource(label_studio_url={self.label_studio_url!r}, token={'***' if self.token else None},"
            f" allowed_local_roots={self.allowed_local_roots!r}, allowed_hosts={self.allowed_hosts!r},"
            f" project_id={self.project_id!r})"
        )


def _bomb_pixels(exc: Exception) -> str:
    """The pixel count Pillow's DecompressionBombError names, as megapixels text."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(found.group(1)) / 1e6:.1f} megapixels" if found else "too many pixels"


def to_8bit(image: Image.Image) -> Image.Image:
    """An ``L`` image scaled from a high-bit-depth greyscale mode; any other image as it is.

    Why: Pillow's ``convert`` clips ``I;16``, ``I`` and ``F`` values at 255, so a 16-bit PNG (depth
    maps, medical and industrial cameras) became an almost all-white frame. Values are scaled by
    the range they are stored in, not by each image's own minimum and maximum, so the frames of a
    sequence show the same value as the same grey:

    * ``I;16*``: the mode's full range, ``value / 257`` (65535 -> 255);
    * ``I`` (32-bit; what Pillow gives 16-bit PPM/PGM files): ``value / 257`` when every value lies
      in 0..65535, the usual case of 16-bit samples in a 32-bit container;
    * ``F``: by the smallest of [0, 1] (normalised floats), [0, 255] and [0, 65535] that holds
      every finite value; NaN is black, infinities the range's ends;
    * ``I`` or ``F`` data outside all of these (negative values, over 65535) is the exception:
      stretched from its own minimum to its maximum, the one mapping left that shows it.
    """
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    values = np.array(image, dtype=np.float32)  # float32 is exact to well under one grey level
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    full_scales = (1.0, 255.0, 65535.0) if image.mode == "F" else (65535.0,)
    fitting = [full for full in full_scales if low >= 0.0 and high <= full]  # I;16 always fits
    offset, span = (0.0, fitting[0]) if fitting else (low, max(high - low, 1e-12))
    np.nan_to_num(values, copy=False, nan=offset, posinf=offset + span, neginf=offset)
    values -= offset
    values *= 255.0 / span
    np.clip(values, 0.0, 255.0, out=values)
    return Image.fromarray(np.rint(values, out=values).astype(np.uint8))  # mode L


def decode_image(data: bytes, *, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode bytes into an RGB image, refusing huge or corrupt ones before decoding pixels.

    The size is read from the header (``Image.open`` decodes no pixels): an image over
    ``max_pixels`` -- or a decompression bomb, whose header claims more pixels than Pillow's own
    limit -- costs a header read and raises :class:`ImageTooLarge` (413). Any failure while
    decoding raises :class:`ImageDecodeError` (422) naming the exception, never anything else.
    16-bit and float greyscale images are scaled to 8 bits first (:func:`to_8bit`).
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(
            f"{name}: the image header claims {_bomb_pixels(exc)} (a decompression bomb?); the "
            f"limit is {max_pixels / 1e6:.1f} megapixels (BOXLOOP_MAX_IMAGE_PIXELS)"
        ) from exc
    except Exception as exc:  # UnidentifiedImageError, OSError, or a plugin's own exception
        raise ImageDecodeError(f"{name}: not a decodable image ({exc.__class__.__name__})") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{name}: {width}x{height} = {width * height / 1e6:.1f} megapixels exceeds the limit of "
            f"{max_pixels / 1e6:.1f} (BOXLOOP_MAX_IMAGE_PIXELS)"
        )
    try:
        image.load()
        upright: Image.Image = ImageOps.exif_transpose(image) or image
        return to_8bit(upright).convert("RGB")
    except Image.DecompressionBombError as exc:  # a frame larger than the header said
        raise ImageTooLarge(f"{name}: decoding would exceed {_bomb_pixels(exc)}") from exc
    except Exception as exc:  # truncated data, broken chunks, bad EXIF, out of memory ...
        raise ImageDecodeError(
            f"{name}: corrupt or truncated image data ({exc.__class__.__name__}: {exc})"
        ) from exc


def _refuse_nul(reference: str, name: str) -> None:
    """No file or URL has a NUL character in its name; the OS would raise a bare ValueError."""
    if "\x00" in reference:
        raise ImageError(f"{name!r}: the image reference contains a NUL character")


def _read_local(path: Path, source: ImageSource, name: str) -> bytes:
    _refuse_nul(str(path), name)  # a file:// URL may spell it %00
    try:
        return _read_allowed_file(path, source, name)
    except (OSError, UnicodeError, ValueError) as exc:  # a name the file system cannot take:
        # too long, a lone surrogate; a file that went away or cannot be read
        raise ImageError(f"{name!a}: the file cannot be read ({type(exc).__name__})") from exc


def _read_allowed_file(path: Path, source: ImageSource, name: str) -> bytes:
    resolved = path.expanduser().resolve()
    roots = [root.expanduser().resolve() for root in source.allowed_local_roots]
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ImageForbidden(
            f"{name}: local path is outside the allowed roots (BOXLOOP_ALLOWED_LOCAL_ROOTS)"
        )
    if not resolved.is_file():
        raise ImageNotFound(f"{name}: no such file {resolved}")
    size = resolved.stat().st_size
    if size > source.max_bytes:
        raise ImageTooLarge(f"{name}: file is {size} bytes, over the {source.max_bytes} byte limit")
    return resolved.read_bytes()


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)``; all empty for a URL that cannot be parsed (a port that is not
    a number, brackets that hold no IPv6 address), which no allow-list entry matches."""
    try:
        parsed = urlparse(url if "://" in url else f"//{url}")
        port = parsed.port
    except ValueError:
        return ("", "", None)
    scheme = parsed.scheme.lower()
    return scheme, (parsed.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)


def _same_origin(a: str, b: str) -> bool:
    return _origin(a) == _origin(b) and bool(_origin(a)[1])


def host_allowed(url: str, allowed_hosts: Sequence[str]) -> bool:
    """Whether ``url`` is on the allow-list: ``scheme://host[:port]`` entries match that origin,
    bare ``host`` or ``host:port`` entries that host (and port) over http or https."""
    scheme, host, port = _origin(url)
    if scheme not in _DEFAULT_PORTS or not host:
        return False
    for entry in allowed_hosts:
        entry = entry.strip()
        if "://" in entry:
            if _same_origin(url, entry):
                return True
            continue
        try:
            bare = urlparse(f"//{entry}")
            entry_port = bare.port
        except ValueError:
            continue
        if (bare.hostname or "").lower() == host and entry_port in (None, port):
            return True
    return False


def trusted_studio_url(
    label_studio_url: str | None, setup_hostname: str | None, allowed_hosts: Sequence[str] = ()
) -> str | None:
    """The Label Studio URL images, tokens and API calls may go to.

    The configured URL (``BOXLOOP_LABEL_STUDIO_URL``) wins. Without one, the ``hostname`` a
    ``/setup`` call named counts only when it is on the allow-list
    (``BOXLOOP_ALLOWED_IMAGE_HOSTS``): ``/setup`` may be called by anyone who reaches the port,
    so its hostname alone must not decide where boxloop sends requests (SSRF).
    """
    if label_studio_url:
        return label_studio_url
    if setup_hostname and host_allowed(setup_hostname, allowed_hosts):
        return setup_hostname
    return None


#: The redirects Label Studio's presign route may answer with (it sends 303); followed once.
_PRESIGN_REDIRECTS = (302, 303, 307)


def _check_status(response: httpx.Response, name: str, *, presign: bool, storage: bool) -> None:
    """Raise the error a non-2xx answer means. ``presign``: the answer of Label Studio's presign
    route; ``storage``: the answer of the presigned URL it redirected to (the bucket)."""
    status = response.status_code
    if storage:
        if status in (401, 403):
            raise ImageForbidden(
                f"{name}: the cloud storage refused the presigned URL Label Studio gave ({status}): "
                "it may have expired, or the storage's credentials in Label Studio cannot read it"
            )
        if status == 404:
            raise ImageNotFound(f"{name}: the cloud storage answered 404 (no such object)")
        if status >= 400:
            raise ImageFetchError(f"{name}: the cloud storage answered {status}")
        if status >= 300:
            raise ImageForbidden(
                f"{name}: the cloud storage answered another redirect ({status}); only one "
                "redirect, Label Studio's to the presigned URL, is followed"
            )
        return
    if status in (401, 403):
        raise ImageForbidden(
            f"{name}: Label Studio refused the image ({status}); check the "
            "token (BOXLOOP_LABEL_STUDIO_TOKEN) and legacy tokens being enabled"
        )
    if status == 404:
        if presign:
            raise ImageNotFound(
                f"{name}: Label Studio answered 404 to the presign request: no cloud storage of "
                "the project holds that URI (add or fix the project's source storage)"
            )
        raise ImageNotFound(f"{name}: Label Studio answered 404 for the image")
    if status >= 400:
        raise ImageFetchError(f"{name}: Label Studio answered {status}")
    if status >= 300:
        raise ImageForbidden(
            f"{name}: the image host answered a redirect ({status}), "
            "usually to a login page: the token was not accepted; redirects are not followed"
        )


def _read_body(response: httpx.Response, source: ImageSource, name: str) -> bytes:
    """The body of a 2xx answer, refused when it is text or JSON or over the size limit."""
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind.startswith("text/") or kind.endswith("json"):
        raise ImageFetchError(
            f"{name}: the image host answered {kind}, not an image (status {response.status_code})"
        )
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > source.max_bytes:
            raise ImageTooLarge(f"{name}: over the {source.max_bytes} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _presigned_target(response: httpx.Response, name: str) -> str:
    """The http(s) URL Label Studio's presign route redirected to."""
    location = response.headers.get("location", "").strip()
    target = urljoin(str(response.url), location) if location else ""
    if urlparse(target).scheme.lower() not in _DEFAULT_PORTS:
        raise ImageForbidden(
            f"{name}: Label Studio's presign route redirected to {target[:80]!r}, not an http(s) "
            "URL; not fetched"
        )
    return target


def _fetch_http(
    url: str,
    source: ImageSource,
    name: str,
    client: httpx.Client | None,
    *,
    presign: bool = False,
) -> bytes:
    """GET an image from Label Studio or an allowed host; no redirect is followed, except with
    ``presign`` (``url`` is Label Studio's presign route): exactly one, to the presigned URL
    Label Studio chose, which gets neither the token nor cookies (it carries its own signature)
    and is not held to the allow-list (the configured Label Studio picked it)."""
    studio = bool(source.label_studio_url) and _same_origin(url, source.label_studio_url or "")
    if not studio and not host_allowed(url, source.allowed_hosts):
        raise ImageForbidden(
            f"{name}: image host is not the configured Label Studio host "
            "(BOXLOOP_LABEL_STUDIO_URL) and not on BOXLOOP_ALLOWED_IMAGE_HOSTS; not fetched"
        )
    # the token goes to Label Studio only, never to another allowed host
    headers: dict[str, str] = {}
    if source.token and studio:
        headers = source.auth() if source.auth else {"Authorization": f"Token {source.token}"}
    own = client is None
    http = client or httpx.Client(timeout=source.timeout_s, follow_redirects=False)
    try:
        with http.stream("GET", url, headers=headers, follow_redirects=False) as response:
            if not (presign and response.status_code in _PRESIGN_REDIRECTS):
                _check_status(response, name, presign=presign, storage=False)
                return _read_body(response, source, name)
            target = _presigned_target(response, name)
        request = http.build_request("GET", target)
        for header in ("authorization", "cookie", "proxy-authorization"):
            request.headers.pop(header, None)  # whatever the client carries for Label Studio
        redirected = http.send(request, stream=True, auth=None, follow_redirects=False)
        try:
            _check_status(redirected, name, presign=False, storage=True)
            return _read_body(redirected, source, name)
        finally:
            redirected.close()
    except httpx.InvalidURL as exc:  # a control character, or past httpx's length limit
        raise ImageError(f"{name!a}: not a URL that can be fetched ({exc})") from exc
    except httpx.HTTPError as exc:
        raise ImageFetchError(
            f"{name}: fetching the image failed ({exc.__class__.__name__})"
        ) from exc
    finally:
        if own:
            http.close()


#: Prefixes of Label Studio's cloud storage URIs (the SDK's ``is_cloud_storage_uri``).
_CLOUD_PREFIXES = ("s3:", "gs:", "azure-blob:")


def is_cloud_storage_uri(reference: object) -> bool:
    """An S3, GCS or Azure Blob URI as Label Studio's cloud source storages put in task data."""
    return isinstance(reference, str) and reference.startswith(_CLOUD_PREFIXES)


def presign_url(label_studio_url: str, project_id: int, uri: str) -> str:
    """Label Studio's route that resolves a cloud URI of a project's storage.

    It answers a 303 redirect to a presigned URL of the bucket (storage with ``presign`` on), or
    the bytes themselves, read from the bucket by Label Studio (``presign`` off); 404 when no
    source storage of the project covers the URI. The SDK's ``get_local_path`` uses the task
    route (``/tasks/{id}/presign/``); the project route needs no task id.
    """
    fileuri = base64.urlsafe_b64encode(uri.encode("utf-8")).decode("ascii")
    return f"{label_studio_url.rstrip('/')}/projects/{int(project_id)}/presign/?fileuri={fileuri}"


def _fetch_cloud(uri: str, source: ImageSource, name: str, client: httpx.Client | None) -> bytes:
    if not source.label_studio_url:
        raise ImageForbidden(
            f"{name}: a cloud storage URI is read through Label Studio, but no Label Studio URL "
            "is known (set BOXLOOP_LABEL_STUDIO_URL and BOXLOOP_LABEL_STUDIO_TOKEN)"
        )
    if source.project_id is None:
        raise ImageForbidden(
            f"{name}: a cloud storage URI is resolved through its Label Studio project's "
            "storage, but no project id is known for this image"
        )
    try:
        url = presign_url(source.label_studio_url, source.project_id, uri)
    except UnicodeError as exc:  # a lone surrogate: no storage holds such a key
        raise ImageError(f"{name!a}: not a URI that can be resolved ({exc})") from exc
    return _fetch_http(url, source, name, client, presign=True)


#: Paths Label Studio serves (uploads, local storage, the newer storage route); any other
#: absolute path is a local file, held to the allowed roots (one under a ``/data`` volume too).
_STUDIO_PATHS = ("/data/upload/", "/data/local-files", "/storage-data/")
#: Label Studio's resolve routes of cloud storage URIs, as its task API (``/api/tasks``) hands
#: them out in place of ``s3://...``: the same answers as :func:`presign_url`'s route.
_RESOLVE_PATH = re.compile(r"/(?:tasks|projects)/\d+/(?:resolve|presign)/\?fileuri=")


def read_image_bytes(
    reference: str, source: ImageSource, *, client: httpx.Client | None = None
) -> bytes:
    """Bytes of the image a task refers to (URL, Label Studio path, cloud storage URI resolved
    through Label Studio -- raw, as ``/predict`` gets it, or as the task API's resolve path --,
    or local path)."""
    if not isinstance(reference, str) or not reference.strip():
        raise ImageDecodeError("task has no image reference")
    name = reference if len(reference) < 120 else reference[:117] + "..."
    _refuse_nul(reference, name)
    if is_cloud_storage_uri(reference):  # Label Studio parses it, not urlparse
        return _fetch_cloud(reference, source, name, client)
    try:
        parsed = urlparse(reference)
    except ValueError as exc:  # e.g. brackets that hold no IPv6 address: http://[bad]/x.png
        raise ImageError(f"{name!r}: not a URL or path that can be read ({exc})") from exc
    if parsed.scheme in ("http", "https"):
        # Label Studio's own resolve route, spelt out with its host (its HOSTNAME setting)
        resolve = bool(source.label_studio_url) and (
            _same_origin(reference, source.label_studio_url or "")
            and _RESOLVE_PATH.match(f"{parsed.path}?{parsed.query}") is not None
        )
        return _fetch_http(reference, source, name, client, presign=resolve)
    if parsed.scheme == "file":
        return _read_local(Path(unquote(parsed.path)), source, name)
    resolve = _RESOLVE_PATH.match(reference) is not None
    if resolve or reference.startswith(_STUDIO_PATHS):
        if not source.label_studio_url:
            raise ImageForbidden(
                f"{name}: a Label Studio path, but no Label Studio URL is known (set "
                "BOXLOOP_LABEL_STUDIO_URL, or list the /setup hostname in BOXLOOP_ALLOWED_IMAGE_HOSTS)"
            )
        return _fetch_http(
            urljoin(source.label_studio_url.rstrip("/") + "/", reference.lstrip("/")),
            source,
            name,
            client,
            presign=resolve,
        )
    if parsed.scheme:
        raise ImageForbidden(f"{name}: unsupported URL scheme {parsed.scheme!r}")
    return _read_local(Path(reference), source, name)


def load_image(
    reference: str, source: ImageSource, *, client: httpx.Client | None = None
) -> Image.Image:
    """Fetch and decode one task image as RGB; raises :class:`ImageError` subclasses."""
    data = read_image_bytes(reference, source, client=client)
    return decode_image(data, max_pixels=source.max_pixels, name=reference[:120])


def image_source_for(
    *,
    label_studio_url: str | None,
    setup_hostname: str | None,
    token: str | None,
    allowed_local_roots: tuple[Path, ...] | list[Path],
    max_pixels: int,
    max_bytes: int,
    timeout_s: float,
    allowed_hosts: Sequence[str] = (),
    auth: Callable[[], dict[str, str]] | None = None,
    project_id: int | None = None,
) -> ImageSource:
    """The configured Label Studio URL wins; the ``/setup`` hostname is used only without one,
    and only when it is on ``allowed_hosts`` (see :func:`trusted_studio_url`). ``project_id``:
    the Label Studio project cloud storage URIs are resolved through."""
    return ImageSource(
        label_studio_url=trusted_studio_url(label_studio_url, setup_hostname, allowed_hosts),
        token=token,
        allowed_local_roots=tuple(allowed_local_roots),
        allowed_hosts=tuple(allowed_hosts),
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        timeout_s=timeout_s,
        auth=auth,
        project_id=project_id,
    )


def task_image_loader(
    source: ImageSource, image_key: str, *, client: httpx.Client | None = None
) -> Callable[[Mapping[str, Any]], Image.Image]:
    """A loader of task images: the reference under ``data[image_key]``, fetched and decoded
    through ``source`` (``ValueError`` when the task data has no image reference there)."""

    def load(data: Mapping[str, Any]) -> Image.Image:
        reference = data.get(image_key)
        if not isinstance(reference, str):
            raise ValueError(f"task data has no image under ${image_key}")
        return load_image(reference, source, client=client)

    return load
