"""JSON every database and client takes: NaN and ±Infinity written as ``null``.

Python's ``json`` writes ``NaN`` and ``Infinity`` and reads them back, and parses a number past
1e308 as ``inf``; JSON has none of them. SQLite stores such text as it is, but PostgreSQL's
``json`` type refuses it, and with it the whole row: a Label Studio annotation holding one
was a 500 and was not stored. Everything boxloop stores as JSON goes through :func:`dumps`
(the store's ``json_serializer``), and the gate's scores through :func:`finite` (mAP is NaN on
a validation slice without boxes).
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "finite"]


def finite(value: Any) -> Any:
    """``value`` with every non-finite float in it (at any depth) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Standard JSON text of ``value``; non-finite floats become ``null``. The common case (all
    finite) costs one plain ``json.dumps``."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:  # a NaN or an infinity somewhere: walk the value once
        return json.dumps(finite(value), allow_nan=False)
