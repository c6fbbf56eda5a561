"""Small generated images with known boxes, for tests that need no shared data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

LABELS = ("Square", "Disc")
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Square"/><Label value="Disc"/>
  </RectangleLabels>
</View>"""


def make_image(
    rng: np.random.Generator, size: tuple[int, int] = (320, 240)
) -> tuple[Image.Image, list[tuple[str, tuple[float, float, float, float]]]]:
    """A noisy background with one to two coloured shapes; returns the image and its boxes."""
    width, height = size
    pixels = rng.integers(60, 120, size=(height, width, 3), dtype=np.uint8)
    objects: list[tuple[str, tuple[float, float, float, float]]] = []
    for _ in range(int(rng.integers(1, 3))):
        label = LABELS[int(rng.integers(0, 2))]
        side = int(rng.integers(40, 90))
        x0 = int(rng.integers(0, width - side))
        y0 = int(rng.integers(0, height - side))
        if label == "Square":
            pixels[y0 : y0 + side, x0 : x0 + side] = (230, 40, 40)
        else:
            yy, xx = np.ogrid[:height, :width]
            r = side / 2
            mask = (yy - (y0 + r)) ** 2 + (xx - (x0 + r)) ** 2 <= r * r
            pixels[mask] = (40, 40, 230)
        objects.append((label, (x0, y0, x0 + side, y0 + side)))
    return Image.fromarray(pixels), objects


def write_dataset(
    root: Path, n: int, seed: int = 0
) -> list[tuple[Path, list[tuple[str, tuple[float, float, float, float]]]]]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image, objects = make_image(rng)
        path = root / f"img{i:03d}.jpg"
        image.save(path, quality=92)
        out.append((path, objects))
    return out


def ls_result(
    objects: list[tuple[str, tuple[float, float, float, float]]], size: tuple[int, int] = (320, 240)
) -> list[dict]:
    """Label Studio regions (percent) for ``objects``, as an annotator would submit them."""
    width, height = size
    return [
        {
            "from_name": "label",
            "to_name": "image",
            "type": "rectanglelabels",
            "original_width": width,
            "original_height": height,
            "value": {
                "x": 100 * x0 / width,
                "y": 100 * y0 / height,
                "width": 100 * (x1 - x0) / width,
                "height": 100 * (y1 - y0) / height,
                "rotation": 0,
                "rectanglelabels": [label],
            },
        }
        for label, (x0, y0, x1, y1) in objects
    ]
