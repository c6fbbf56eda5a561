from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.images import (
    ImageDecodeError,
    ImageError,
    ImageFetchError,
    ImageForbidden,
    ImageNotFound,
    ImageSource,
    ImageTooLarge,
    decode_image,
    host_allowed,
    image_source_for,
    is_cloud_storage_uri,
    load_image,
    trusted_studio_url,
)


def _png(size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_local_images_only_under_allowed_roots(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png())
    source = ImageSource(None, None, (allowed,))
    assert load_image(str(allowed / "a.png"), source).size == (8, 6)
    assert load_image(f"file://{allowed / 'a.png'}", source).size == (8, 6)
    with pytest.raises(ImageForbidden, match="outside the allowed roots"):
        load_image(str(tmp_path / "secret.png"), source)
    with pytest.raises(ImageForbidden):
        load_image(str(allowed / ".." / "secret.png"), source)
    with pytest.raises(ImageNotFound):
        load_image(str(allowed / "missing.png"), source)


def test_remote_hosts_other_than_label_studio_are_refused() -> None:
    source = ImageSource("http://127.0.0.1:8080", "t0ken")
    with pytest.raises(ImageForbidden, match="not the configured Label Studio host"):
        load_image("http://169.254.169.254/latest/meta-data", source)
    with pytest.raises(ImageForbidden, match="no Label Studio URL"):
        load_image("/data/upload/1/x.png", ImageSource(None, None))
    assert "t0ken" not in repr(source)


def test_corrupt_and_huge_images() -> None:
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        decode_image(b"definitely not an image", max_pixels=10**6)
    truncated = _png((64, 64))[:60]
    with pytest.raises(ImageDecodeError):
        decode_image(truncated, max_pixels=10**6)
    with pytest.raises(ImageTooLarge, match="megapixels"):
        decode_image(_png((200, 100)), max_pixels=10_000)
    assert decode_image(_png(), max_pixels=10**6).mode == "RGB"


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG header claiming ``width`` x ``height`` pixels, with next to no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_too_large_from_its_header() -> None:
    # 400 megapixels: over Pillow's own bomb limit, which raises at Image.open
    with pytest.raises(ImageTooLarge, match=r"header claims 400\.0 megapixels"):
        decode_image(_bomb_png(20_000, 20_000), max_pixels=40_000_000)
    # 100 megapixels: Pillow only warns; boxloop's limit refuses it
    with pytest.raises(ImageTooLarge, match=r"10000x10000"):
        decode_image(_bomb_png(10_000, 10_000), max_pixels=40_000_000)


def test_a_16_bit_greyscale_png_is_scaled_to_8_bits_not_clipped_white() -> None:
    """``convert("RGB")`` clipped I;16 values at 255: 99.6 % of this ramp decoded as white."""
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
    decoded = decode_image(buffer.getvalue(), max_pixels=10**6)
    assert decoded.mode == "RGB" and decoded.size == (256, 8)
    rgb = np.asarray(decoded).astype(np.int32)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert len(np.unique(rgb[..., 0])) >= 250  # ~256 grey levels, not black and white
    assert np.abs(rgb[..., 0] - ramp / 257).max() <= 1  # value / 257


def test_a_16_bit_training_image_given_by_path_is_scaled_too(tmp_path: Path) -> None:
    """Training images given as paths (the benchmark's datasets) were opened apart from
    :func:`decode_image` and still clipped white."""
    from backend.training.samples import load_image_like

    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    rgb = np.asarray(load_image_like(tmp_path / "ramp.png")).astype(np.int32)
    assert np.abs(rgb[..., 0] - ramp / 257).max() <= 1


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # F, normalised
        (np.array([[0.0, 100.0, 255.0]], np.float32), [0, 100, 255]),  # F, 8-bit range
        (np.array([[0.0, 257.0 * 100, 65535.0]], np.float32), [0, 100, 255]),  # F, 16-bit range
        (np.array([[-1.0, 0.0, 1.0]], np.float32), [0, 128, 255]),  # F, other: its own range
        (np.array([[0, 257 * 100, 65535]], np.int32), [0, 100, 255]),  # I holding 16-bit data
    ],
)
def test_float_and_32_bit_greyscale_images_are_scaled_to_8_bits(
    values: np.ndarray, expected: list[int]
) -> None:
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="TIFF")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode in ("F", "I")
    rgb = np.asarray(decode_image(buffer.getvalue(), max_pixels=10**6))
    assert rgb[0, :, 0].tolist() == expected and np.array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize(
    "error", [SyntaxError("broken PNG file"), struct.error("unpack"), MemoryError(), KeyError(5)]
)
def test_any_decoding_failure_is_a_named_decode_error(
    error: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_args: object, **_kwargs: object) -> None:
        raise error

    data = _png()
    monkeypatch.setattr(Image.Image, "load", fail)
    with pytest.raises(ImageDecodeError, match=type(error).__name__):
        decode_image(data, max_pixels=10**6)
    monkeypatch.undo()
    monkeypatch.setattr(Image, "open", fail)
    with pytest.raises(ImageDecodeError, match=type(error).__name__):
        decode_image(data, max_pixels=10**6)


@pytest.mark.parametrize("url", ["http://[bad]/x.png", "//[::1", "http://a]b/x.png", "[^x]"])
def test_urls_python_cannot_parse_are_refused_not_raised(url: str) -> None:
    """``urlparse`` raises ValueError for brackets that hold no IPv6 address. As a /setup
    hostname such a URL made every later /predict of the project a 500; as an image, its task."""
    assert not host_allowed(url, ["bad", "a", "::1"])
    assert not host_allowed("http://ls/x.png", [url, "[::1"])
    assert trusted_studio_url(None, url, [url]) is None
    with pytest.raises(ImageError):  # its task's own 4xx, never a bare ValueError (a 500)
        load_image(url, ImageSource(None, None))


def test_image_hosts_allow_list() -> None:
    assert host_allowed("http://ls:8080/data/x.png", ["http://ls:8080"])
    assert host_allowed("https://cdn.example/x.png", ["cdn.example"])
    assert host_allowed("http://ls/x.png", ["ls:80"])
    assert not host_allowed("http://ls:8081/x.png", ["ls:8080"])
    assert not host_allowed("http://ls/x.png", ["https://ls"])
    assert not host_allowed("file:///etc/passwd", ["ls"])
    assert not host_allowed("http://evil.example/x.png", [])
    # a /setup hostname counts only when allow-listed; a configured URL always wins
    assert trusted_studio_url(None, "http://10.0.0.1:8080", []) is None
    assert trusted_studio_url(None, "http://ls:8080", ["ls:8080"]) == "http://ls:8080"
    assert trusted_studio_url("http://conf:8080", "http://ls:8080", ["ls"]) == "http://conf:8080"
    source = image_source_for(
        label_studio_url=None,
        setup_hostname="http://10.0.0.1:8080",
        token="t",
        allowed_local_roots=[],
        max_pixels=10,
        max_bytes=10,
        timeout_s=1,
    )
    assert source.label_studio_url is None
    with pytest.raises(ImageForbidden, match="BOXLOOP_ALLOWED_IMAGE_HOSTS"):
        load_image("/data/upload/1/x.png", source)
    with pytest.raises(ImageForbidden, match="BOXLOOP_ALLOWED_IMAGE_HOSTS"):
        load_image("http://10.0.0.1:8080/data/upload/1/x.png", source)


def test_an_absolute_path_under_data_is_a_local_file_unless_label_studio_serves_it(
    tmp_path: Path,
) -> None:
    """Every path under ``/data/`` was sent to Label Studio (with the token), so images under a
    ``/data`` volume (the Docker image's data directory) were never read from disk; only Label
    Studio's own routes go there."""
    source = ImageSource("http://127.0.0.1:9", "t0ken", (tmp_path,))
    with pytest.raises(ImageForbidden, match="outside the allowed roots"):
        load_image("/data/frames/a.png", source)  # a local file: held to the roots, not fetched
    with pytest.raises(ImageFetchError):  # Label Studio's route: fetched (nothing listens on 9)
        load_image("/data/upload/1/a.png", source)


# --------------------------------------------------------------------- cloud storage URIs
Route = tuple[int, dict[str, str], bytes]


@dataclass
class _Stub:
    """A local HTTP server answering fixed responses by path (query ignored); records the
    path and the headers of every request it got."""

    routes: dict[str, Route]
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def paths(self) -> list[str]:
        return [path.split("?")[0] for path, _ in self.seen]


def _handler(stub: _Stub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            stub.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            missing: Route = (404, {"Content-Type": "text/plain"}, b"no such route")
            status, headers, body = stub.routes.get(self.path.split("?")[0], missing)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, Route]], _Stub]]:
    """Factory: ``serve(routes)`` starts a :class:`_Stub` on a free port of 127.0.0.1."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(routes: dict[str, Route]) -> _Stub:
        stub = _Stub(routes)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
        stub.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return stub

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


PRESIGN = "/projects/7/presign/"
SIGNED = "/bucket/a.png"
PNG = {"Content-Type": "image/png"}


def _cloud_source(studio: _Stub, **kwargs: Any) -> ImageSource:
    """Label Studio at ``studio``, project 7; the bucket is on no allow-list."""
    return ImageSource(studio.url, "t0ken", project_id=7, **kwargs)


def _redirect(target: str, status: int = 303) -> Route:
    # Label Studio may set cookies on its answers; the client keeps them for the host
    return (status, {"Location": target, "Set-Cookie": "sessionid=ls-secret; Path=/"}, b"")


@pytest.mark.parametrize(
    "uri", ["s3://bucket/a.png", "gs://bucket/dir/a b.png", "azure-blob://container/a.png"]
)
@pytest.mark.parametrize("status", [302, 303, 307])
def test_a_cloud_uri_is_presigned_by_label_studio_and_its_redirect_followed_without_the_token(
    serve: Callable[[dict[str, Route]], _Stub], uri: str, status: int
) -> None:
    bucket = serve({SIGNED: (200, PNG, _png())})
    studio = serve({PRESIGN: _redirect(f"{bucket.url}{SIGNED}?X-Amz-Signature=abc", status)})
    with httpx.Client(follow_redirects=False) as client:  # shared, as the service's is
        client.cookies.set("csrftoken", "ls-cookie", domain="127.0.0.1")
        assert load_image(uri, _cloud_source(studio), client=client).size == (8, 6)
    assert is_cloud_storage_uri(uri)
    [(path, headers)] = studio.seen
    assert path == f"{PRESIGN}?fileuri={base64.urlsafe_b64encode(uri.encode()).decode()}"
    assert headers["authorization"] == "Token t0ken"
    [(signed, bucket_headers)] = bucket.seen
    assert signed == f"{SIGNED}?X-Amz-Signature=abc"
    # the presigned URL carries its own signature: no token, no Label Studio cookie
    assert "authorization" not in bucket_headers and "cookie" not in bucket_headers


@pytest.mark.parametrize("absolute", [False, True])
def test_the_resolve_path_of_label_studios_task_api_is_followed_like_a_cloud_uri(
    serve: Callable[[dict[str, Route]], _Stub], absolute: bool
) -> None:
    """``/api/tasks`` (what boxloop reads for bulk predictions, queues and training) hands out
    ``/tasks/{id}/resolve/?fileuri=...`` in place of ``s3://...``."""
    bucket = serve({SIGNED: (200, PNG, _png())})
    studio = serve({"/tasks/5/resolve/": _redirect(f"{bucket.url}{SIGNED}?X-Amz-Signature=abc")})
    fileuri = base64.urlsafe_b64encode(b"s3://bucket/a.png").decode()
    reference = f"/tasks/5/resolve/?fileuri={fileuri}"
    reference = f"{studio.url}{reference}" if absolute else reference
    source = ImageSource(studio.url, "t0ken")  # no project id needed: the route names the task
    assert load_image(reference, source).size == (8, 6)
    assert studio.seen[0] == (f"/tasks/5/resolve/?fileuri={fileuri}", studio.seen[0][1])
    assert studio.seen[0][1]["authorization"] == "Token t0ken"
    assert "authorization" not in bucket.seen[0][1]


def test_a_cloud_uri_of_a_storage_without_presign_is_read_from_label_studio_itself(
    serve: Callable[[dict[str, Route]], _Stub],
) -> None:
    studio = serve({PRESIGN: (200, {"Content-Type": "image/png"}, _png((5, 4)))})
    auth = lambda: {"Authorization": "Bearer access"}  # noqa: E731 (a personal access token)
    assert load_image("s3://bucket/a.png", _cloud_source(studio, auth=auth)).size == (5, 4)
    assert studio.seen[0][1]["authorization"] == "Bearer access"


def test_only_one_redirect_is_followed(serve: Callable[[dict[str, Route]], _Stub]) -> None:
    elsewhere = serve({"/x.png": (200, PNG, _png())})
    bucket = serve({SIGNED: _redirect(f"{elsewhere.url}/x.png", 302)})
    studio = serve({PRESIGN: _redirect(f"{bucket.url}{SIGNED}")})
    with pytest.raises(ImageForbidden, match=r"another redirect \(302\); only one"):
        load_image("s3://bucket/a.png", _cloud_source(studio))
    assert bucket.paths() == [SIGNED] and elsewhere.seen == []


@pytest.mark.parametrize("status", [301, 308])
def test_label_studio_redirects_other_than_302_303_307_are_not_followed(
    serve: Callable[[dict[str, Route]], _Stub], status: int
) -> None:
    bucket = serve({SIGNED: (200, PNG, _png())})
    studio = serve({PRESIGN: _redirect(f"{bucket.url}{SIGNED}", status)})
    with pytest.raises(ImageForbidden, match="redirects are not followed"):
        load_image("s3://bucket/a.png", _cloud_source(studio))
    assert bucket.seen == []


def test_a_redirect_to_anything_but_http_is_refused(
    serve: Callable[[dict[str, Route]], _Stub],
) -> None:
    studio = serve({PRESIGN: _redirect("file:///etc/passwd")})
    with pytest.raises(ImageForbidden, match=r"not an http\(s\) URL"):
        load_image("s3://bucket/a.png", _cloud_source(studio))


def test_other_fetches_still_refuse_redirects(serve: Callable[[dict[str, Route]], _Stub]) -> None:
    bucket = serve({SIGNED: (200, PNG, _png())})
    studio = serve({"/data/upload/1/a.png": _redirect(f"{bucket.url}{SIGNED}")})
    source = _cloud_source(studio, allowed_hosts=(bucket.url,))
    with pytest.raises(ImageForbidden, match="redirects are not followed"):
        load_image("/data/upload/1/a.png", source)
    with pytest.raises(ImageForbidden, match="redirects are not followed"):
        load_image(f"{studio.url}/data/upload/1/a.png", source)
    assert bucket.seen == []


def test_a_uri_no_storage_of_the_project_holds_is_a_clear_404(
    serve: Callable[[dict[str, Route]], _Stub],
) -> None:
    studio = serve({})  # Label Studio answers 404 when no storage of the project matches
    with pytest.raises(ImageNotFound, match="no cloud storage of the project holds that URI"):
        load_image("s3://other-bucket/a.png", _cloud_source(studio))


def test_the_presigned_answer_keeps_every_other_rule(
    serve: Callable[[dict[str, Route]], _Stub],
) -> None:
    bucket = serve(
        {
            SIGNED: (200, PNG, _png((64, 64))),
            "/expired.png": (403, {"Content-Type": "application/xml"}, b"<Error/>"),
            "/gone.png": (404, {"Content-Type": "application/xml"}, b"<Error/>"),
            "/page.png": (200, {"Content-Type": "text/html"}, b"<html/>"),
        }
    )
    studio = serve(
        {
            PRESIGN: _redirect(f"{bucket.url}{SIGNED}"),
            "/projects/8/presign/": _redirect(f"{bucket.url}/expired.png"),
            "/projects/9/presign/": _redirect(f"{bucket.url}/gone.png"),
            "/projects/10/presign/": _redirect(f"{bucket.url}/page.png"),
            "/projects/11/presign/": (403, {}, b""),
        }
    )
    uri = "s3://bucket/a.png"
    with pytest.raises(ImageTooLarge, match="byte limit"):
        load_image(uri, _cloud_source(studio, max_bytes=100))
    with pytest.raises(ImageForbidden, match="storage refused the presigned URL"):
        load_image(uri, ImageSource(studio.url, "t0ken", project_id=8))
    with pytest.raises(ImageNotFound, match="cloud storage answered 404"):
        load_image(uri, ImageSource(studio.url, "t0ken", project_id=9))
    with pytest.raises(ImageFetchError, match="text/html, not an image"):
        load_image(uri, ImageSource(studio.url, "t0ken", project_id=10))
    with pytest.raises(ImageForbidden, match="BOXLOOP_LABEL_STUDIO_TOKEN"):
        load_image(uri, ImageSource(studio.url, "t0ken", project_id=11))


def test_a_cloud_uri_without_a_project_or_label_studio_is_a_clear_error() -> None:
    with pytest.raises(ImageForbidden, match="no project id is known"):
        load_image("s3://bucket/a.png", ImageSource("http://127.0.0.1:9", "t0ken"))
    with pytest.raises(ImageForbidden, match="no Label Studio URL is known"):
        load_image("gs://bucket/a.png", ImageSource(None, None, project_id=7))


def test_a_projects_image_source_names_the_project(tmp_path: Path) -> None:
    from backend.settings import Settings
    from backend.store import Store
    from backend.studio_access import StudioAccess

    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        label_studio_url="http://studio:8080",
        reconcile_on_startup=False,
    )
    store = Store(settings.resolved_database_url)
    store.upsert_project(
        3,
        label_config="<View/>",
        from_name="label",
        to_name="image",
        image_key="image",
        labels=["cat"],
        hostname=None,
    )
    access = StudioAccess(settings, store)
    assert access.image_source(store.get_project(3)).project_id == 3
    assert access.image_source_of(3).project_id == 3
    assert access.image_source_of(4).project_id == 4  # not stored: configured URL still applies
    assert access.image_source_of(None).project_id is None
