"""Stored JSON is standard JSON: NaN and infinities become null, everything else is unchanged."""

from __future__ import annotations

import json
import math

from backend.jsonsafe import dumps, finite


def test_finite_values_are_written_as_json_dumps_writes_them() -> None:
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": (3, 4.0)}, "big": 10**30}
    assert dumps(value) == json.dumps(value)


def test_nan_and_infinities_become_null_at_any_depth() -> None:
    value = {"x": math.nan, "r": [{"y": math.inf}, (-math.inf, 1.5)], "ok": 2.0}
    text = dumps(value)
    assert json.loads(text) == {"x": None, "r": [{"y": None}, [None, 1.5]], "ok": 2.0}
    assert "NaN" not in text and "Infinity" not in text
    assert finite([math.nan, 1]) == [None, 1] and finite(math.inf) is None
