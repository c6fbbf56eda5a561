"""Fetching and decoding task images, with errors that say what went wrong.

Label Studio tasks point at images as ``/data/local-files/?d=...`` or
``/data/upload/...`` (served by Label Studio, need its token), as absolute URLs,
or as local paths. Fetches go only to the configured Label Studio host or to
files under the allowed local roots: a task cannot make the backend read
arbitrary files or call arbitrary hosts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError


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

    label_studio_url: str | None
    token: str | None
    allowed_local_roots: tuple[Path, ...] = ()
    max_pixels: int = 40_000_000
    max_bytes: int = 50 * 1024 * 1024
    timeout_s: float = 20.0

    def __repr__(self) -> str:  # never print the token
        return (
            f"ImageSource(label_studio_url={self.label_studio_url!r}, token={'***' if self.token else None},"
            f" allowed_local_roots={self.allowed_local_roots!r})"
        )


def decode_image(data: bytes, *, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode bytes into an RGB image, refusing huge or corrupt ones before decoding pixels."""
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as exc:
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
        return upright.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{name}: corrupt or truncated image data ({exc})") from exc


def _read_local(path: Path, source: ImageSource, name: str) -> bytes:
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


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlparse(a), urlparse(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def _fetch_http(url: str, source: ImageSource, name: str, client: httpx.Client | None) -> bytes:
    if not source.label_studio_url or not _same_origin(url, source.label_studio_url):
        raise ImageForbidden(
            f"{name}: image host is not the configured Label Studio host; only that host is fetched"
        )
    headers = {"Authorization": f"Token {source.token}"} if source.token else {}
    own = client is None
    http = client or httpx.Client(timeout=source.timeout_s, follow_redirects=False)
    try:
        with http.stream("GET", url, headers=headers) as response:
            if response.status_code in (401, 403):
                raise ImageForbidden(
                    f"{name}: Label Studio refused the image ({response.status_code}); check the "
                    "token (BOXLOOP_LABEL_STUDIO_TOKEN) and legacy tokens being enabled"
                )
            if response.status_code == 404:
                raise ImageNotFound(f"{name}: Label Studio answered 404 for the image")
            if response.status_code >= 400:
                raise ImageFetchError(f"{name}: Label Studio answered {response.status_code}")
            chunks: list[bytes] = []
            total = 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > source.max_bytes:
                    raise ImageTooLarge(f"{name}: over the {source.max_bytes} byte limit")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise ImageFetchError(
            f"{name}: fetching the image failed ({exc.__class__.__name__})"
        ) from exc
    finally:
        if own:
            http.close()


def read_image_bytes(
    reference: str, source: ImageSource, *, client: httpx.Client | None = None
) -> bytes:
    """Bytes of the image a task refers to (URL, Label Studio path, or local path)."""
    if not isinstance(reference, str) or not reference.strip():
        raise ImageDecodeError("task has no image reference")
    name = reference if len(reference) < 120 else reference[:117] + "..."
    parsed = urlparse(reference)
    if parsed.scheme in ("http", "https"):
        return _fetch_http(reference, source, name, client)
    if parsed.scheme == "file":
        return _read_local(Path(unquote(parsed.path)), source, name)
    if reference.startswith("/data/"):
        if not source.label_studio_url:
            raise ImageForbidden(
                f"{name}: a Label Studio path, but no Label Studio URL is known "
                "(set BOXLOOP_LABEL_STUDIO_URL or connect through /setup)"
            )
        return _fetch_http(
            urljoin(source.label_studio_url.rstrip("/") + "/", reference.lstrip("/")),
            source,
            name,
            client,
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
) -> ImageSource:
    """The configured Label Studio URL wins; the ``/setup`` hostname is used only without one."""
    return ImageSource(
        label_studio_url=label_studio_url or setup_hostname,
        token=token,
        allowed_local_roots=tuple(allowed_local_roots),
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        timeout_s=timeout_s,
    )
