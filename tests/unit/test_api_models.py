"""The HTTP models state the id range exactly: the spec's project-key pattern is 1 to MAX_ID."""

from __future__ import annotations

import random
import re

import pytest

from backend.api_models import ProjectKey, _digits_at_most
from backend.ingest import MAX_ID


@pytest.mark.parametrize(
    "limit", [1, 7, 9, 10, 19, 20, 99, 100, 101, 250, 999, 5039, 10**9, MAX_ID]
)
def test_the_digit_pattern_matches_exactly_1_to_the_limit(limit: int) -> None:
    pattern = re.compile(f"^{_digits_at_most(limit)}$")
    rng = random.Random(limit)
    numbers = set(range(min(limit + 50, 3000))) | {limit - 1, limit, limit + 1, 10 * limit}
    numbers |= {rng.randrange(1, 3 * limit + 2) for _ in range(2000)}
    wrong = [n for n in sorted(numbers) if bool(pattern.match(str(n))) != (1 <= n <= limit)]
    assert wrong == []
    assert not pattern.match("01") and not pattern.match("")


def test_project_keys_past_label_studios_ids_are_refused_by_the_spec_pattern() -> None:
    from pydantic import TypeAdapter, ValidationError

    keys = TypeAdapter(ProjectKey)
    assert keys.validate_python(f"{MAX_ID}.1795390608") == f"{MAX_ID}.1795390608"
    assert keys.validate_python("7") == "7"
    for bad in (f"{MAX_ID + 1}", f"{MAX_ID + 1}.1795390608", "0.5", "07", "2924340087"):
        with pytest.raises(ValidationError):
            keys.validate_python(bad)
