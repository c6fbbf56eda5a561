from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

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
