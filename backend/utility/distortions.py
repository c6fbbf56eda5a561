"""Distortions whose effect on detectors defines utility labels.

Why JPEG first: it is the distortion of the paper and of most imported camera streams. The other
kinds (Gaussian blur, Gaussian noise, down-and-up scaling) are there to test a predictor on a
distortion it never saw in training: a predictor that only learnt "JPEG blocking ⇒ useless" fails
on them.

Every distortion returns **decoded pixels** (a fresh RGB :class:`PIL.Image.Image` with no
``quantization`` attribute): the JPEG file's own tables state its quality, and a predictor fed the
file could read the answer instead of judging the content. :func:`encode_jpeg` keeps the bytes for
the one baseline that is *meant* to read them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter

__all__ = [
    "DEFAULT_JPEG_QUALITIES",
    "Distortion",
    "DistortionKind",
    "decode",
    "encode_jpeg",
    "encode_png",
    "jpeg_series",
]

DistortionKind = Literal["jpeg", "blur", "noise", "downscale"]

#: Nine JPEG qualities (the paper's nine compression ratios). Chosen so that YOLOX-Nano keeps its
#: detections at the top and loses most of them at the bottom, giving both labels.
DEFAULT_JPEG_QUALITIES: tuple[int, ...] = (2, 4, 6, 8, 10, 15, 20, 30, 50)


@dataclass(frozen=True)
class Distortion:
    """One distortion at one level.

    Attributes:
        kind: ``jpeg`` (``level`` = quality 1–95), ``blur`` (Gaussian σ in pixels), ``noise``
            (Gaussian σ in 0–255 grey levels), ``downscale`` (factor > 1: shrink by it, then
            enlarge back with bilinear interpolation).
        level: the kind's strength parameter, as above.
    """

    kind: DistortionKind
    level: float

    def __post_init__(self) -> None:
        if self.kind == "jpeg" and not 1 <= self.level <= 95:
            raise ValueError(f"JPEG quality must be within 1..95, got {self.level}")
        if self.kind in ("blur", "noise") and self.level < 0:
            raise ValueError(f"{self.kind} sigma must be ≥ 0, got {self.level}")
        if self.kind == "downscale" and self.level < 1:
            raise ValueError(f"downscale factor must be ≥ 1, got {self.level}")
        if self.kind not in ("jpeg", "blur", "noise", "downscale"):
            raise ValueError(f"unknown distortion kind {self.kind!r}")

    @property
    def name(self) -> str:
        """``jpeg_q10``, ``blur_s2.0``: a stable key for tables and files."""
        if self.kind == "jpeg":
            return f"jpeg_q{int(self.level)}"
        return f"{self.kind}_s{float(self.level):g}"

    @classmethod
    def parse(cls, text: str) -> Distortion:
        """``jpeg:10``, ``blur:2``, ``noise:25``, ``downscale:4`` → a :class:`Distortion`."""
        kind, sep, level = text.partition(":")
        if not sep:
            raise ValueError(f"distortion {text!r}: expected KIND:LEVEL, e.g. jpeg:10")
        if kind not in ("jpeg", "blur", "noise", "downscale"):
            raise ValueError(f"distortion {text!r}: kind must be jpeg, blur, noise or downscale")
        return cls(kind, float(level))  # type: ignore[arg-type]

    def apply(self, image: Image.Image, seed: int = 0) -> Image.Image:
        """The distorted image, decoded (RGB, same size). ``seed`` fixes the noise pattern."""
        rgb = image.convert("RGB")
        if self.kind == "jpeg":
            return decode(encode_jpeg(rgb, int(self.level)))
        if self.kind == "blur":
            return rgb.filter(ImageFilter.GaussianBlur(radius=float(self.level)))
        if self.kind == "noise":
            rng = np.random.default_rng(seed)
            pixels = np.asarray(rgb, np.float32)
            noisy = pixels + rng.normal(0.0, float(self.level), pixels.shape).astype(np.float32)
            return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")
        width, height = rgb.size
        small = (max(1, round(width / self.level)), max(1, round(height / self.level)))
        shrunk = rgb.resize(small, Image.Resampling.BILINEAR, reducing_gap=None)
        return shrunk.resize((width, height), Image.Resampling.BILINEAR)


def jpeg_series(qualities: Sequence[int] = DEFAULT_JPEG_QUALITIES) -> list[Distortion]:
    """One JPEG :class:`Distortion` per quality."""
    return [Distortion("jpeg", int(q)) for q in qualities]


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline JPEG bytes at ``quality`` (Pillow/libjpeg's IJG scaling), 4:2:0 subsampling."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=int(quality), subsampling=2)
    return buffer.getvalue()


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes: the same pixels, and no header that states a JPEG quality."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    """Decoded RGB pixels of an encoded image, detached from the file (no ``quantization``)."""
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        return Image.fromarray(np.asarray(opened.convert("RGB")), "RGB")
