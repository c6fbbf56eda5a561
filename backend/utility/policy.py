"""What a project does with a task's predicted utility: ignore it, flag the task, or move it to
the end of the queue.

Why a separate, pure module: the decision is the same whoever applies it (the ``/predict`` path,
an order push, the benchmark), and it must not depend on HTTP, the store or Label Studio. The
queue side works on the same ``task_ids`` list the orders (:mod:`backend.ordering`) produce, so
"move to end" is one more transformation of an order, pushed by the same queue code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["UtilityAction", "UtilityPolicy"]

UtilityAction = Literal["ignore", "flag", "move_to_end"]
ACTIONS: tuple[str, ...] = ("ignore", "flag", "move_to_end")
#: Decimal places of a stored score (the task data field and the prediction meta).
DIGITS = 4


@dataclass(frozen=True)
class UtilityPolicy:
    """A project's choice.

    Attributes:
        action: ``ignore`` (score stored, nothing else), ``flag`` (the task's data field and the
            prediction's meta say ``low_utility``), ``move_to_end`` (flag, and low-utility tasks
            go after every other task of the order, keeping their relative order).
        threshold: a task is low-utility when its probability of being useful is below it.
        data_field: the task data key the score is written to.
    """

    action: UtilityAction = "flag"
    threshold: float = 0.5
    data_field: str = "boxloop_utility"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"utility action must be one of {', '.join(ACTIONS)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"utility threshold must be within [0, 1], got {self.threshold}")
        if not self.data_field:
            raise ValueError("utility data field must not be empty")

    @staticmethod
    def stored(score: float) -> float:
        """The score as it is stored and shown (:data:`DIGITS` places)."""
        return round(float(score), DIGITS)

    def is_low(self, score: float | None) -> bool:
        """Low utility (``None``: not scored, never low).

        Decided on the stored (rounded) score, whether given raw or rounded: deciding on the raw
        one flagged 0.49996 low in the prediction meta while the task data, which the order and
        ``/status`` read, held 0.5, not low.
        """
        return score is not None and self.stored(score) < self.threshold

    def meta(self, score: float | None) -> dict[str, Any]:
        """What goes into a prediction's meta and the task's data field."""
        if score is None:
            return {}
        out: dict[str, Any] = {"utility": self.stored(score)}
        if self.action != "ignore":
            out["low_utility"] = self.is_low(score)
        return out

    def order(self, task_ids: Sequence[int], scores: Mapping[int, float]) -> list[int]:
        """``task_ids`` with low-utility tasks moved to the end (``move_to_end`` only)."""
        if self.action != "move_to_end":
            return list(task_ids)
        keep = [t for t in task_ids if not self.is_low(scores.get(t))]
        low = [t for t in task_ids if self.is_low(scores.get(t))]
        return keep + low

    def counts(self, scores: Mapping[int, float]) -> dict[str, int]:
        """For ``/status``: tasks scored, low-utility, and the action taken on them."""
        low = sum(1 for s in scores.values() if self.is_low(s))
        return {
            "scored": len(scores),
            "low_utility": low,
            "flagged": low if self.action in ("flag", "move_to_end") else 0,
            "moved_to_end": low if self.action == "move_to_end" else 0,
        }
