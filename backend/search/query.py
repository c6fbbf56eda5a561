"""The search query: objects placed on a canvas, each a box plus a class name or strokes.

Why its own module: the CLI, the HTTP endpoint and the benchmark all build the same typed
:class:`SearchQuery` from JSON, and every check on user input lives here, so a bad query fails
with one clear message (:class:`QueryError`, a 422 over HTTP) before any model runs.

JSON form (coordinates in percent of the canvas, as Label Studio's regions)::

    {"objects": [
        {"box": {"x": 10, "y": 20, "width": 30, "height": 40}, "label": "car"},
        {"box": {"x": 50, "y": 50, "width": 20, "height": 30},
         "strokes": [[[52, 55], [60, 70], [65, 72]], [[55, 60], [58, 61]]]}
    ], "k": 50}

An object with ``strokes`` is encoded by the sketch encoder (its ``label``, if any, is only
kept for display); an object with only ``label`` uses the learned class embedding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_OBJECTS",
    "MAX_POINTS",
    "QueryError",
    "QueryObject",
    "SearchQuery",
    "parse_query",
]

#: Limits on one query (a canvas a person draws stays far below them).
MAX_OBJECTS = 16
MAX_POINTS = 20_000

Point = tuple[float, float]
Stroke = tuple[Point, ...]


class QueryError(ValueError):
    """A query a user must fix; the message says what is wrong (HTTP 422)."""


@dataclass(frozen=True)
class QueryObject:
    """One object of a query.

    Attributes:
        box: ``(x0, y0, x1, y1)`` as fractions of the canvas, 0 ≤ x0 < x1 ≤ 1.
        label: a class name (class-embedding object), or the display name of a sketch.
        strokes: free-hand strokes, points as canvas fractions; ``None`` for a class-only object.
    """

    box: tuple[float, float, float, float]
    label: str | None = None
    strokes: tuple[Stroke, ...] | None = None

    @property
    def is_sketch(self) -> bool:
        return bool(self.strokes)

    def to_json(self) -> dict[str, Any]:
        x0, y0, x1, y1 = self.box
        out: dict[str, Any] = {
            "box": {
                "x": 100 * x0,
                "y": 100 * y0,
                "width": 100 * (x1 - x0),
                "height": 100 * (y1 - y0),
            }
        }
        if self.label is not None:
            out["label"] = self.label
        if self.strokes:
            out["strokes"] = [[[100 * x, 100 * y] for x, y in s] for s in self.strokes]
        return out


@dataclass(frozen=True)
class SearchQuery:
    """A canvas of objects (at least one)."""

    objects: tuple[QueryObject, ...]

    def to_json(self) -> dict[str, Any]:
        return {"objects": [o.to_json() for o in self.objects]}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise QueryError(f"{where}: expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int past float's range (JSON allows any length)
        raise QueryError(f"{where}: must be finite") from None
    if not math.isfinite(number):
        raise QueryError(f"{where}: must be finite")
    return number


def _box(value: Any, where: str) -> tuple[float, float, float, float]:
    if not isinstance(value, Mapping):
        raise QueryError(f"{where}: expected an object with x, y, width, height (percent)")
    missing = [k for k in ("x", "y", "width", "height") if k not in value]
    if missing:
        raise QueryError(f"{where}: missing {', '.join(missing)}")
    x, y, w, h = (_number(value[k], f"{where}.{k}") for k in ("x", "y", "width", "height"))
    if w <= 0 or h <= 0:
        raise QueryError(f"{where}: width and height must be > 0 (percent of the canvas)")
    if x < 0 or y < 0 or x + w > 100 + 1e-6 or y + h > 100 + 1e-6:
        raise QueryError(f"{where}: the box must lie inside the canvas (0..100 percent)")
    return (x / 100, y / 100, min(1.0, (x + w) / 100), min(1.0, (y + h) / 100))


def _strokes(value: Any, where: str, budget: list[int]) -> tuple[Stroke, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise QueryError(f"{where}: expected a list of strokes, each a list of [x, y] points")
    strokes: list[Stroke] = []
    for s, stroke in enumerate(value):
        if not isinstance(stroke, Sequence) or isinstance(stroke, str) or not stroke:
            raise QueryError(f"{where}[{s}]: a stroke is a non-empty list of [x, y] points")
        points: list[Point] = []
        for p, point in enumerate(stroke):
            if not isinstance(point, Sequence) or isinstance(point, str) or len(point) != 2:
                raise QueryError(f"{where}[{s}][{p}]: a point is [x, y] in percent")
            x = _number(point[0], f"{where}[{s}][{p}][0]")
            y = _number(point[1], f"{where}[{s}][{p}][1]")
            if not (0 <= x <= 100 and 0 <= y <= 100):
                raise QueryError(f"{where}[{s}][{p}]: points lie in 0..100 percent")
            points.append((x / 100, y / 100))
        budget[0] -= len(points)
        if budget[0] < 0:
            raise QueryError(f"a query holds at most {MAX_POINTS} stroke points")
        strokes.append(tuple(points))
    if not strokes:
        raise QueryError(f"{where}: no strokes (leave strokes out for a class-only object)")
    return tuple(strokes)


def parse_query(data: Any, labels: Sequence[str] | None = None) -> SearchQuery:
    """A :class:`SearchQuery` from its JSON form; :class:`QueryError` names the first problem.

    ``labels``: the class names the model knows; a class-only object naming another is refused.
    """
    if not isinstance(data, Mapping):
        raise QueryError("a query is a JSON object with an 'objects' list")
    raw = data.get("objects")
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise QueryError("'objects' must be a non-empty list of {box, label or strokes}")
    if len(raw) > MAX_OBJECTS:
        raise QueryError(f"a query holds at most {MAX_OBJECTS} objects, got {len(raw)}")
    known = set(labels) if labels is not None else None
    budget = [MAX_POINTS]
    objects = []
    for i, item in enumerate(raw):
        where = f"objects[{i}]"
        if not isinstance(item, Mapping):
            raise QueryError(f"{where}: expected an object with box and label or strokes")
        unknown = set(item) - {"box", "label", "strokes"}
        if unknown:
            raise QueryError(f"{where}: unknown field(s) {sorted(unknown)}")
        box = _box(item.get("box"), f"{where}.box")
        label = item.get("label")
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise QueryError(f"{where}.label: expected a non-empty string")
        strokes = None
        if item.get("strokes") is not None:
            strokes = _strokes(item["strokes"], f"{where}.strokes", budget)
        if strokes is None and label is None:
            raise QueryError(f"{where}: give a label or strokes")
        if strokes is None and known is not None and label not in known:
            raise QueryError(
                f"{where}.label: unknown class {label!r}; the search model knows "
                f"{', '.join(sorted(known))}"
            )
        objects.append(QueryObject(box, label, strokes))
    return SearchQuery(tuple(objects))
