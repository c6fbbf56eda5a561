from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from backend.images import (
    ImageDecodeError,
    ImageForbidden,
    ImageNotFound,
    ImageSource,
    ImageTooLarge,
    decode_image,
    load_image,
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
