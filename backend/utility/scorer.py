"""A project's utility scores: the served predictor, and the scores kept in task data.

Why task data: a score written into ``data[<utility_data_field>]`` is stored by boxloop (its task
table) and by Label Studio alike, survives re-syncing tasks from Label Studio, and is visible
in the data manager, where annotators can filter and sort by it. No new table is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from backend.settings import Settings, SettingsError
from backend.utility.policy import UtilityPolicy
from backend.utility.predictor import UtilityPredictor

__all__ = ["UtilityScorer", "stored_scores"]

log = logging.getLogger(__name__)


class UtilityScorer:
    """The utility predictor (onnxruntime) and the project policy that reads its scores."""

    def __init__(self, model_path: Path, policy: UtilityPolicy, num_threads: int = 2) -> None:
        self.predictor = UtilityPredictor(model_path, num_threads=num_threads)
        self.policy = policy

    @classmethod
    def from_settings(cls, settings: Settings) -> UtilityScorer | None:
        """``None`` when ``BOXLOOP_UTILITY_MODEL`` is unset. A file that is missing or does not
        load is a :class:`SettingsError` naming the variable and the path, so the server stops
        at start with one line (it was a traceback)."""
        if settings.utility_model is None:
            return None
        path = Path(settings.utility_model)
        if not path.is_file():
            raise SettingsError(f"BOXLOOP_UTILITY_MODEL names {path}, which is no file")
        policy = UtilityPolicy(
            settings.utility_action, settings.utility_threshold, settings.utility_data_field
        )
        try:
            return cls(path, policy, settings.num_threads)
        except (
            Exception
        ) as exc:  # onnxruntime's errors (InvalidProtobuf, ...) derive from Exception
            raise SettingsError(
                f"BOXLOOP_UTILITY_MODEL names {path}, which does not load as a utility predictor "
                f"(an ONNX file from `boxloop bench utility`): {type(exc).__name__}: "
                f"{str(exc)[:300]}"
            ) from exc

    @property
    def field(self) -> str:
        return self.policy.data_field

    def score(self, images: Sequence[Image.Image]) -> list[float]:
        """Probability that each image is useful to a detector."""
        if not images:
            return []
        return [float(p) for p in self.predictor.predict_proba(list(images))]

    def fields(self, score: float) -> dict[str, Any]:
        """What a score adds to a task's data: the stored (rounded) score under the policy's
        field, merged into the task's current data by whoever writes it."""
        return {self.field: self.policy.stored(score)}


def stored_scores(tasks: Iterable[tuple[int, Mapping[str, Any]]], field: str) -> dict[int, float]:
    """``{task id: score}`` for the tasks whose data carries a numeric ``field``."""
    out: dict[int, float] = {}
    for task_id, data in tasks:
        value = data.get(field) if isinstance(data, Mapping) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[int(task_id)] = float(value)
    return out
