"""Free-hand strokes → a raster the object encoder reads, and the Quick, Draw! file format.

Why rasters: the single-object encoder runs the same pretrained CNN on sketches as on image
crops (only its last layers differ, as in Bui et al.'s partially shared triplet network), so a
sketch is drawn as black lines on white, in the aspect of its box, as a crop would be.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from backend.search.query import QueryObject, Stroke

__all__ = ["load_quickdraw", "object_raster", "render_strokes", "strokes_into_box"]


def render_strokes(
    strokes: Sequence[Stroke], size: tuple[int, int] = (224, 224), width: int | None = None
) -> Image.Image:
    """Strokes with points in [0, 1]² of the frame drawn into an RGB image of ``size``.

    The line width scales with the image (about 1/64 of its shorter side unless given).
    """
    w, h = size
    image = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    line = width or max(2, round(min(w, h) / 64))
    for stroke in strokes:
        points = [(x * (w - 1), y * (h - 1)) for x, y in stroke]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse((x - line / 2, y - line / 2, x + line / 2, y + line / 2), fill=(0, 0, 0))
        else:
            draw.line(points, fill=(0, 0, 0), width=line, joint="curve")
    return image


def object_raster(obj: QueryObject, size: tuple[int, int] = (224, 224)) -> Image.Image:
    """R[Q, O]: the part of the canvas inside the object's box, with its strokes, as an image.

    The box is stretched to ``size`` (image crops are resized the same way before the CNN).
    """
    if not obj.strokes:
        raise ValueError("object has no strokes")
    x0, y0, x1, y1 = obj.box
    bw, bh = max(x1 - x0, 1e-6), max(y1 - y0, 1e-6)
    local = [tuple(((x - x0) / bw, (y - y0) / bh) for x, y in s) for s in obj.strokes]
    return render_strokes(local, size)


def strokes_into_box(
    strokes: Sequence[Stroke], box: tuple[float, float, float, float], margin: float = 0.05
) -> tuple[Stroke, ...]:
    """Scale strokes (any coordinates) so that their extent fills ``box`` (canvas fractions),
    less a small margin: how the benchmark places a sketch into a ground-truth box."""
    xs = [x for s in strokes for x, _ in s]
    ys = [y for s in strokes for _, y in s]
    sx0, sx1, sy0, sy1 = min(xs), max(xs), min(ys), max(ys)
    x0, y0, x1, y1 = box
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    x0, x1, y0, y1 = x0 + mx, x1 - mx, y0 + my, y1 - my
    sw, sh = max(sx1 - sx0, 1e-6), max(sy1 - sy0, 1e-6)
    return tuple(
        tuple(
            (
                min(1.0, max(0.0, x0 + (x - sx0) / sw * (x1 - x0))),
                min(1.0, max(0.0, y0 + (y - sy0) / sh * (y1 - y0))),
            )
            for x, y in s
        )
        for s in strokes
    )


def load_quickdraw(path: Path, limit: int | None = None) -> list[tuple[Stroke, ...]]:
    """Drawings of a Quick, Draw! *simplified* ndjson file (``drawing`` = ``[[xs], [ys]]`` per
    stroke, 0..255), each as strokes normalised to its own extent in [0, 1]²."""
    drawings: list[tuple[Stroke, ...]] = []
    with Path(path).open() as fh:
        for line in fh:
            if not line.strip():
                continue
            record = json.loads(line)
            strokes = [
                tuple((float(x), float(y)) for x, y in zip(s[0], s[1], strict=False))
                for s in record["drawing"]
                if s and s[0]
            ]
            if not strokes:
                continue
            drawings.append(strokes_into_box(strokes, (0.0, 0.0, 1.0, 1.0), margin=0.04))
            if limit is not None and len(drawings) >= limit:
                break
    return drawings
